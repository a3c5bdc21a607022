"""publish-features against a real Redis and a real Redis Cluster: key layout, values,
replacement, TTLs."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from redis import Redis, RedisCluster
from redis.crc import key_slot
from trainer_helpers import stored_json, stored_list

from app.settings import Settings
from models.cli import parser
from models.dataset import ColumnSpec, Dataset
from models.online_store import connect, publish, user_records
from models.redis_keys import DEFAULT_PREFIX, check_prefix, history_key, user_key
from models.train_config import PRESETS, TrainConfig


@pytest.fixture
def store(redis_client: Redis, redis_prefix: str) -> tuple[Redis, str]:
    """A real Redis (conftest: the local one, or a redis-server of the tests' own) and a key
    prefix of this test alone (deleted afterwards)."""
    return redis_client, redis_prefix


def hand_dataset() -> Dataset:
    interactions = pd.DataFrame(
        [
            ("u2", "i1", 5),
            ("u1", "i1", 1),
            ("u2", "i2", 5),  # same time as u2's i1, later in the log: newer
            ("u1", "i3", 2),
            ("u1", "i2", 3),
        ],
        columns=["user_id", "item_id", "timestamp"],
    ).astype({"timestamp": "int64"})
    users = pd.DataFrame(
        {
            "age_group": ["25-34", "55+", None],
            "activity": [np.float64(3.5), np.nan, np.float64(7.0)],
        },
        index=pd.Index(["u1", "u2", "u3"], name="user_id"),
    )
    items = pd.DataFrame({"category": ["a", "b", "c"]}, index=["i1", "i2", "i3"])
    return Dataset(
        name="hand",
        interactions=interactions,
        users=users,
        items=items,
        user_columns=(ColumnSpec("age_group", "categorical"), ColumnSpec("activity", "numeric")),
        item_columns=(ColumnSpec("category", "categorical"),),
    )


def test_key_layout() -> None:
    assert DEFAULT_PREFIX == "tr"
    assert user_key("tr", "42") == "tr:user:{42}"
    assert history_key("tr", "42") == "tr:hist:{42}"


@pytest.mark.parametrize(
    ("user_id", "tag"),
    [("u1", "u1"), ("a{b", "a{b"), ("a}b", "a%7Db"), ("}", "%7D"), ("50%", "50%25"),
     ("%7D", "%257D")],
)  # fmt: skip
def test_the_user_id_is_the_hash_tag_of_both_keys(user_id: str, tag: str) -> None:
    """Redis hashes what lies between a key's first `{` and the next `}`: the whole id, with
    `}` (and `%`, to keep ids apart) percent-encoded, so both keys share a slot."""
    assert user_key("tr", user_id) == f"tr:user:{{{tag}}}"
    assert history_key("tr", user_id) == f"tr:hist:{{{tag}}}"
    assert key_slot(user_key("tr", user_id).encode()) == key_slot(tag.encode())
    assert key_slot(history_key("tr", user_id).encode()) == key_slot(tag.encode())


@pytest.mark.parametrize("prefix", ["", "a{b", "tr}"])
def test_a_prefix_with_a_brace_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match=re.escape("without '{' or '}'")):
        check_prefix(prefix)
    with pytest.raises(ValueError, match=re.escape("without '{' or '}'")):
        publish(Redis(), hand_dataset(), prefix=prefix)  # before any connection


def test_user_records_drop_missing_values_and_order_newest_first() -> None:
    records = list(user_records(hand_dataset(), history_length=2))
    assert records == [
        ("u1", {"age_group": "25-34", "activity": 3.5}, ["i2", "i3"]),
        ("u2", {"age_group": "55+"}, ["i2", "i1"]),
        ("u3", {"activity": 7.0}, []),
    ]
    assert type(records[0][1]["activity"]) is float  # plain JSON-able values


def test_infinite_values_are_dropped_like_nan(store: tuple[Redis, str]) -> None:
    """The encoder reads inf as missing; strict JSON (the service's parser) has no Infinity,
    and a value it cannot parse would cost the user every other feature too."""
    client, prefix = store
    dataset = hand_dataset()
    dataset.users.loc["u1", "activity"] = np.inf
    records = {user: features for user, features, _ in user_records(dataset, history_length=2)}
    assert records["u1"] == {"age_group": "25-34"}
    publish(client, dataset, prefix=prefix)
    assert stored_json(client, user_key(prefix, "u1")) == {"age_group": "25-34"}


@pytest.mark.parametrize("chunk", [1, 1000])
def test_publish_writes_and_replaces_keys(store: tuple[Redis, str], chunk: int) -> None:
    client, prefix = store
    client.set(user_key(prefix, "u1"), json.dumps({"stale": True}))
    client.rpush(history_key(prefix, "u1"), "old1", "old2", "old3", "old4")
    client.rpush(history_key(prefix, "u3"), "old")
    n = publish(client, hand_dataset(), prefix=prefix, history_length=3, chunk=chunk)
    assert n == 3
    assert stored_json(client, user_key(prefix, "u1")) == {"age_group": "25-34", "activity": 3.5}
    assert stored_json(client, user_key(prefix, "u2")) == {"age_group": "55+"}
    assert stored_json(client, user_key(prefix, "u3")) == {"activity": 7.0}
    assert stored_list(client, history_key(prefix, "u1")) == ["i2", "i3", "i1"]
    assert stored_list(client, history_key(prefix, "u2")) == ["i2", "i1"]
    assert not client.exists(history_key(prefix, "u3"))  # no interactions: no stale history
    keys = {str(k) for k in client.scan_iter(match=f"{prefix}:*")}
    assert keys == {user_key(prefix, u) for u in ("u1", "u2", "u3")} | {
        history_key(prefix, u) for u in ("u1", "u2")
    }
    assert client.ttl(user_key(prefix, "u1")) == -1  # no TTL unless asked


def test_publish_with_ttl(store: tuple[Redis, str]) -> None:
    client, prefix = store
    publish(client, hand_dataset(), prefix=prefix, history_length=2, ttl_seconds=300)
    for key in (user_key(prefix, "u1"), history_key(prefix, "u1"), user_key(prefix, "u3")):
        assert 0 < client.ttl(key) <= 300
    assert stored_list(client, history_key(prefix, "u1")) == ["i2", "i3"]


def test_publish_writes_to_a_cluster_and_replaces_keys(
    redis_cluster_url: str, cluster_prefix: str
) -> None:
    client = connect(redis_cluster_url, cluster=True)
    admin = RedisCluster.from_url(redis_cluster_url, decode_responses=True)
    try:
        admin.rpush(history_key(cluster_prefix, "u1"), "old1", "old2", "old3", "old4")
        n = publish(client, hand_dataset(), prefix=cluster_prefix, history_length=3, chunk=2)
        assert n == 3
        for user, features, items in user_records(hand_dataset(), history_length=3):
            assert stored_json(admin, user_key(cluster_prefix, user)) == features
            assert stored_list(admin, history_key(cluster_prefix, user)) == items
        assert not admin.exists(history_key(cluster_prefix, "u3"))
    finally:
        client.close()
        admin.close()


def test_a_long_history_is_written_whole(store: tuple[Redis, str]) -> None:
    """Past Lua's unpack() limit (a few thousand values), the script pushes in slices."""
    client, prefix = store
    dataset = hand_dataset()
    many = pd.DataFrame(
        {"user_id": "u3", "item_id": [f"i{n}" for n in range(9000)], "timestamp": range(9000)}
    )
    dataset = Dataset(
        name="long",
        interactions=pd.concat([dataset.interactions, many], ignore_index=True),
        users=dataset.users,
        items=dataset.items,
        user_columns=dataset.user_columns,
        item_columns=dataset.item_columns,
    )
    publish(client, dataset, prefix=prefix, history_length=9000)
    assert stored_list(client, history_key(prefix, "u3")) == [f"i{n}" for n in range(8999, -1, -1)]


def test_the_stored_history_holds_what_every_default_tower_reads() -> None:
    """publish-features and the service keep the same newest items by default, and no user
    tower the trainer makes by default reads more of them than that."""
    stored = Settings.model_fields["history_cap"].default
    publish_default = parser().parse_args(
        ["publish-features", "--data", "synthetic", "--redis-url", "redis://unused"]
    )
    assert publish_default.history_length == stored
    for tower in PRESETS:
        config = TrainConfig.create(**{"tower.user_tower": tower})
        assert config.history_length <= stored
