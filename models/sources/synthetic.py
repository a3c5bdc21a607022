"""Built-in synthetic source (`synthetic[:seed=S,users=U,items=I,topics=T,per_user=N]`).

No files; everything follows from the seed. The data has planted structure, so retrieval
quality is measurable and a model that learns it clearly beats most-popular:

1. Topics. Each of T topics has a global popularity (Dirichlet) and an age group and
   country it is most popular with. Items are split evenly over topics at random.
2. Items. Within a topic, popularity is Zipf-like (weight 1 / rank^0.9, random ranks).
   `category` is the topic's own category (T // 2 of them, so two topics share one) with
   probability 0.8, else a random one; `tags` are 1-3 tags, each one of the topic's three
   own tags with probability 0.6, else any of the 3T tags; `price` is log-normal around a
   topic-specific level.
3. Users. Each user prefers 1-3 topics (drawn by topic popularity) with Dirichlet weights.
   `age_group` and `country` are those of the main topic with probability 0.6 / 0.4, else
   random; the number of interactions is uniform in [2N/3, 4N/3]; `activity` is that
   number times log-normal noise.
4. Sequences. The topic of each next interaction is the previous one's with probability 0.6,
   else a fresh draw from the user's preferences (a random topic with probability 0.05), so
   recent behaviour predicts the next item. The item is drawn from the topic's Zipf
   distribution, redrawing items the user already has (a few rounds; leftovers are dropped).
5. Time. Each user is active over 90-365 days starting uniformly between 2002-01-01 and
   2003-09-01 (ending by 2004-01-01 at the latest); timestamps are strictly increasing per
   user, so the `seed-2003` split has both training history and test data for many users.

Default size (users=2000, items=1000, topics=20, per_user=45) trains in seconds;
items=1,000,000 with users=20,000 generates in a few seconds for serving benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from models.dataset import ColumnSpec, DataError, Dataset
from models.sources._common import assemble

USER_COLUMNS = (
    ColumnSpec("age_group", "categorical"),
    ColumnSpec("country", "categorical"),
    ColumnSpec("activity", "numeric", transform="log"),
)
ITEM_COLUMNS = (
    ColumnSpec("category", "categorical"),
    ColumnSpec("tags", "multi_hot", separator="|"),
    ColumnSpec("price", "numeric", transform="log"),
)
AGE_GROUPS = ("under-18", "18-24", "25-34", "35-44", "45-54", "55+")
COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "CA", "ES", "NL")
START = 1009843200  # 2002-01-01T00:00:00Z
LAST_START = 1062374400  # 2003-09-01T00:00:00Z
END = 1072915200  # 2004-01-01T00:00:00Z
DAY = 86400
STAY = 0.6
EXPLORE = 0.05
ZIPF = 0.9
_REDRAW_ROUNDS = 8


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the generator (see the module docstring for the generative story).

    Args:
        seed: random seed; the data is a pure function of the config.
        users: number of users (every one has at least one interaction).
        items: number of items in the catalogue.
        topics: number of latent topics; None means min(20, items).
        per_user: mean number of interactions per user.
    """

    seed: int = 0
    users: int = 2000
    items: int = 1000
    topics: int | None = None
    per_user: int = 45

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise DataError("synthetic: seed must be at least 0")
        for field in ("users", "items", "per_user"):
            if getattr(self, field) < 1:
                raise DataError(f"synthetic: {field} must be at least 1")
        if self.topics is not None and not 1 <= self.topics <= self.items:
            raise DataError("synthetic: topics must be between 1 and items")

    @property
    def n_topics(self) -> int:
        return self.topics if self.topics is not None else min(20, self.items)


def generate(config: SyntheticConfig, name: str = "synthetic") -> Dataset:
    """Generate a synthetic dataset.

    Args:
        config: sizes and seed.
        name: the source string, recorded as `Dataset.name`.

    Example:
        >>> ds = generate(SyntheticConfig(seed=3, users=100, items=50))
        >>> ds.summary()["n_users"]
        100
    """
    rng = np.random.default_rng(config.seed)
    n_topics = config.n_topics
    topic_weight = rng.dirichlet(np.full(n_topics, 2.0))
    topic_age = rng.integers(len(AGE_GROUPS), size=n_topics)
    topic_country = rng.integers(len(COUNTRIES), size=n_topics)

    item_topic = rng.permutation(np.arange(config.items) % n_topics)
    draw_items = _item_sampler(rng, item_topic, n_topics)
    user_of, topic, counts, preferred = _walks(rng, config, topic_weight)
    item = _distinct_per_user(user_of, topic, draw_items, config.items)
    keep = item >= 0
    user_of, item = user_of[keep], item[keep]

    times = _timestamps(rng, user_of, config.users)
    user_ids = np.array([f"u{k}" for k in range(config.users)], dtype=object)
    item_ids = np.array([f"i{k}" for k in range(config.items)], dtype=object)
    interactions = pd.DataFrame(
        {"user_id": user_ids[user_of], "item_id": item_ids[item], "timestamp": times}
    )
    users = _users(rng, user_ids, preferred[:, 0], topic_age, topic_country, counts)
    items = _items(rng, item_ids, item_topic, n_topics)
    return assemble(name, interactions, users, items, USER_COLUMNS, ITEM_COLUMNS)


def _item_sampler(
    rng: np.random.Generator, item_topic: np.ndarray, n_topics: int
) -> Callable[[np.ndarray], np.ndarray]:
    """`draw(topics)`: one item per topic, Zipf-distributed by popularity rank within it."""
    n_items = len(item_topic)
    # Items ordered by (topic, popularity rank); cumulative within-topic weights are offset by
    # the topic number, so one searchsorted over `topic + u` samples every draw at once.
    by_topic = np.argsort(item_topic, kind="stable")
    sizes = np.bincount(item_topic, minlength=n_topics)
    rank = np.arange(n_items) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    weight = 1.0 / (rank + 1.0) ** ZIPF
    cum = np.cumsum(weight)
    topic_end = np.cumsum(sizes) - 1
    topic_total = cum[topic_end] - np.concatenate(([0.0], cum[topic_end[:-1]]))
    cum = (cum - np.repeat(cum[topic_end] - topic_total, sizes)) / np.repeat(topic_total, sizes)
    cum[topic_end] = 1.0
    cum += np.repeat(np.arange(n_topics), sizes)

    def draw(topic: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(cum, topic + rng.random(len(topic)), side="right")
        return by_topic[np.minimum(pos, n_items - 1)]

    return draw


def _walks(
    rng: np.random.Generator, config: SyntheticConfig, topic_weight: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Each user's steps and the topic of each step: a user mixes up to three preferred
    topics, stays on a topic with probability `STAY`, explores with `EXPLORE`. Returns the
    user of each step, its topic, steps per user and the users' preferred topics."""
    n_topics = len(topic_weight)
    counts = rng.integers(
        max(1, config.per_user * 2 // 3), config.per_user * 4 // 3 + 1, size=config.users
    )
    user_of = np.repeat(np.arange(config.users), counts)
    preferred = rng.choice(n_topics, size=(config.users, 3), p=topic_weight)
    mix = rng.dirichlet(np.ones(3), size=config.users)
    mix *= np.arange(3) < rng.integers(1, 4, size=config.users)[:, None]
    mix_cum = np.cumsum(mix / mix.sum(axis=1, keepdims=True), axis=1)

    fresh_slot = (rng.random(len(user_of))[:, None] > mix_cum[user_of]).sum(axis=1)
    fresh = preferred[user_of, np.minimum(fresh_slot, 2)]
    explore = rng.random(len(user_of)) < EXPLORE
    fresh[explore] = rng.integers(n_topics, size=int(explore.sum()))
    first = np.cumsum(counts) - counts
    redraw = rng.random(len(user_of)) >= STAY
    redraw[first] = True
    # The topic of step t is the fresh draw of the latest step <= t that redrew it.
    source = np.maximum.accumulate(np.where(redraw, np.arange(len(user_of)), 0))
    return user_of, fresh[source], counts, preferred


def _distinct_per_user(
    user_of: np.ndarray,
    topic: np.ndarray,
    draw_items: Callable[[np.ndarray], np.ndarray],
    n_items: int,
) -> np.ndarray:
    """Draw one item per step, redrawing repeats of a (user, item) pair; -1 marks leftovers."""
    item = draw_items(topic)
    for round_ in range(_REDRAW_ROUNDS + 1):
        key = user_of.astype(np.int64) * n_items + item
        _, first = np.unique(key, return_index=True)
        repeat = np.ones(len(key), dtype=bool)
        repeat[first] = False
        repeat &= item >= 0
        if not repeat.any():
            break
        if round_ == _REDRAW_ROUNDS:
            item[repeat] = -1
        else:
            item[repeat] = draw_items(topic[repeat])
    return item


def _timestamps(rng: np.random.Generator, user_of: np.ndarray, n_users: int) -> np.ndarray:
    counts = np.bincount(user_of, minlength=n_users)
    start = rng.uniform(START, LAST_START, size=n_users)
    length = np.minimum(rng.uniform(90 * DAY, 365 * DAY, size=n_users), END - start)
    # Sorted uniform positions per user: cumulative exponential gaps, normalised per user.
    gaps = rng.exponential(size=len(user_of))
    total = np.cumsum(gaps)
    offset = np.repeat(total[np.cumsum(counts) - counts] - gaps[np.cumsum(counts) - counts], counts)
    span = np.bincount(user_of, weights=gaps, minlength=n_users) + rng.exponential(size=n_users)
    fraction = (total - offset) / span[user_of]
    step = np.arange(len(user_of)) - np.repeat(np.cumsum(counts) - counts, counts)
    # Adding the step index makes per-user timestamps strictly increasing after flooring.
    return (np.floor(start[user_of] + fraction * length[user_of]) + step).astype(np.int64)


def _users(
    rng: np.random.Generator,
    ids: np.ndarray,
    main_topic: np.ndarray,
    topic_age: np.ndarray,
    topic_country: np.ndarray,
    counts: np.ndarray,
) -> pd.DataFrame:
    n = len(ids)
    age = np.where(
        rng.random(n) < 0.6, topic_age[main_topic], rng.integers(len(AGE_GROUPS), size=n)
    )
    country = np.where(
        rng.random(n) < 0.4, topic_country[main_topic], rng.integers(len(COUNTRIES), size=n)
    )
    activity = np.round(counts * rng.lognormal(0.0, 0.3, size=n), 2)
    return pd.DataFrame(
        {
            "age_group": np.array(AGE_GROUPS, dtype=object)[age],
            "country": np.array(COUNTRIES, dtype=object)[country],
            "activity": activity,
        },
        index=pd.Index(ids, name="user_id", dtype="str"),
    )


def _items(
    rng: np.random.Generator, ids: np.ndarray, item_topic: np.ndarray, n_topics: int
) -> pd.DataFrame:
    n = len(ids)
    n_categories = max(1, n_topics // 2)
    category = np.where(
        rng.random(n) < 0.8, item_topic % n_categories, rng.integers(n_categories, size=n)
    )
    n_tags = 3 * n_topics
    own = item_topic[:, None] * 3 + rng.integers(3, size=(n, 3))
    tag = np.where(rng.random((n, 3)) < 0.6, own, rng.integers(n_tags, size=(n, 3)))
    # Blank out slots beyond each item's 1-3 tags, then repeats; -1 indexes the empty name.
    tag[np.arange(3) >= rng.integers(1, 4, size=n)[:, None]] = -1
    tag = np.sort(tag, axis=1)
    tag[:, 1:][tag[:, 1:] == tag[:, :-1]] = -1
    # Join strings once per distinct tag set, not once per item (there are far fewer).
    key = ((tag[:, 0] + 1) * (n_tags + 1) + tag[:, 1] + 1) * (n_tags + 1) + tag[:, 2] + 1
    distinct, inverse = np.unique(key, return_inverse=True)
    names = np.array([f"t{k}" for k in range(n_tags)] + [""], dtype=object)
    combos = np.stack([distinct // (n_tags + 1) ** 2, distinct // (n_tags + 1), distinct], axis=1)
    joined = ["|".join(filter(None, row)) for row in names[combos % (n_tags + 1) - 1].tolist()]
    tags = np.array(joined, dtype=object)[inverse]
    level = rng.uniform(1.5, 4.5, size=n_topics)
    price = np.round(np.exp(rng.normal(level[item_topic], 0.5)), 2)
    return pd.DataFrame(
        {
            "category": np.array([f"c{k}" for k in range(n_categories)], dtype=object)[category],
            "tags": tags,
            "price": price,
        },
        index=pd.Index(ids, name="item_id", dtype="str"),
    )
