"""Towers: every part scripts to TorchScript and matches eager; normalised outputs; padding."""

import io
import itertools

import pytest
import torch
from torch import Tensor, nn

from models.features import HISTORY, Feature, FeatureEncoder
from models.fields import MultiHotField
from models.towers import (
    HISTORY_ENCODERS,
    AttentionHistory,
    MeanHistory,
    SENet,
    TowerConfig,
    TwoTower,
    UserTower,
)

ITEM_IDS = ["a", "b", "c", "d", "e", "f"]
USER_ENCODER = FeatureEncoder(
    [
        Feature("gender", "categorical", vocabulary={"F": 1, "M": 2}),
        Feature("genres", "multi_hot", vocabulary={"x": 1, "y": 2, "z": 3}, max_values=2),
        Feature("income", "numeric", transform="standard", mean=10.0, std=4.0),
        Feature("age", "numeric", transform="bucket", boundaries=[18.0, 30.0]),
    ],
    history_length=4,
    item_index={item: row for row, item in enumerate(ITEM_IDS)},
)
ITEM_ENCODER = FeatureEncoder(
    [
        Feature("category", "categorical", vocabulary={"c1": 1, "c2": 2}),
        Feature("price", "numeric", transform="log", mean=1.0, std=1.0),
    ]
)
VARIANTS = list(itertools.product(sorted(HISTORY_ENCODERS), [False, True]))


def model(history_encoder: str, senet: bool) -> TwoTower:
    torch.manual_seed(0)
    config = TowerConfig(
        field_dim=8, hidden=(16,), out_dim=5, senet=senet, history_encoder=history_encoder
    )
    return TwoTower(USER_ENCODER, ITEM_ENCODER, len(ITEM_IDS), config).eval()


def user_inputs() -> dict[str, Tensor]:
    encoded = USER_ENCODER.encode(
        [
            {"gender": "F", "genres": "x|y", "income": 14.0, "age": 25},
            {"gender": "M", "genres": ["z"], "income": 2.0, "age": 40},
            {},  # nothing known: a cold-start user
            {"gender": "?", "genres": "q", "age": 12},
        ],
        [["c", "a", "f", "b", "d"], ["b"], [], ["zz"]],
    )
    return {name: torch.from_numpy(values) for name, values in encoded.items()}


def item_inputs() -> tuple[Tensor, dict[str, Tensor]]:
    encoded = ITEM_ENCODER.encode(
        [{"category": "c1", "price": 3.0}, {"category": "c2"}, {}, {"price": 100.0}]
    )
    return torch.tensor([0, 5, 2, 3]), {k: torch.from_numpy(v) for k, v in encoded.items()}


def scripted_roundtrip(module: nn.Module) -> torch.jit.ScriptModule:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


@pytest.mark.parametrize(("history_encoder", "senet"), VARIANTS)
@torch.no_grad()
def test_every_part_scripts_and_matches_eager(history_encoder: str, senet: bool) -> None:
    m = model(history_encoder, senet)
    users = user_inputs()
    items, item_feats = item_inputs()
    user_script = scripted_roundtrip(m.user_tower)
    torch.testing.assert_close(user_script(users), m.user_tower(users), rtol=0, atol=1e-6)
    item_script = scripted_roundtrip(m.item_tower)
    torch.testing.assert_close(
        item_script(items, item_feats), m.item_tower(items, item_feats), rtol=0, atol=1e-6
    )
    body = m.user_tower.body
    for name, part in body.fields.items():
        torch.testing.assert_close(
            torch.jit.script(part)(users[name]), part(users[name]), rtol=0, atol=1e-6
        )
    fields = torch.randn(4, len(body.fields), 8)
    torch.testing.assert_close(torch.jit.script(body.gate)(fields), body.gate(fields))
    torch.testing.assert_close(
        torch.jit.script(body.mlp)(fields.flatten(1)), body.mlp(fields.flatten(1))
    )
    torch.testing.assert_close(torch.jit.script(body)(users), body(users), rtol=0, atol=1e-6)
    assert isinstance(body.gate, SENet) == senet
    assert isinstance(body.fields[HISTORY], HISTORY_ENCODERS[history_encoder])


@pytest.mark.parametrize(("history_encoder", "senet"), VARIANTS)
@torch.no_grad()
def test_outputs_are_l2_normalised_and_finite(history_encoder: str, senet: bool) -> None:
    m = model(history_encoder, senet)
    users = m.user_tower(user_inputs())
    items, item_feats = item_inputs()
    item_vectors = m.item_tower(items, item_feats)
    for out in (users, item_vectors):
        assert out.shape == (4, 5)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))
    # A batch where nobody has a history (every row padding) still gives unit vectors.
    empty = user_inputs()
    empty[HISTORY] = torch.zeros_like(empty[HISTORY])
    out = m.user_tower(empty)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(4))


@pytest.mark.parametrize(("history_encoder", "senet"), VARIANTS)
@torch.no_grad()
def test_padding_rows_never_change_the_output(history_encoder: str, senet: bool) -> None:
    m = model(history_encoder, senet)
    users = user_inputs()
    items, item_feats = item_inputs()
    before_users = m.user_tower(users)
    before_items = m.item_tower(items, item_feats)
    assert m.item_embedding.weight[0].abs().sum() == 0
    genres = m.user_tower.body.fields["genres"]
    assert isinstance(genres, MultiHotField)
    # Even a padding row that somehow became non-zero is masked out of every pooling.
    m.item_embedding.weight[0] = torch.randn(8) * 10
    genres.embedding.weight[0] = torch.randn(8) * 10
    torch.testing.assert_close(m.user_tower(users), before_users, rtol=0, atol=1e-6)
    torch.testing.assert_close(m.item_tower(items, item_feats), before_items, rtol=0, atol=0)


def test_an_unseen_value_adds_nothing_when_training_never_saw_one() -> None:
    m = model("mean", False).train()
    fields = m.user_tower.body.fields
    tables = [fields["gender"].embedding, fields["age"].embedding]
    assert all(t.weight[0].abs().sum() == 0 for t in tables)
    # Training on known values only (no index 0) leaves the unknown rows at zero.
    known = USER_ENCODER.encode(
        [{"gender": "F", "genres": "x", "income": 1.0, "age": 25}] * 2, [["a"], ["b"]]
    )
    users = {name: torch.from_numpy(values) for name, values in known.items()}
    optimiser = torch.optim.Adam(m.parameters(), lr=0.1)
    for _ in range(3):
        optimiser.zero_grad()
        m.user_tower(users).sum().backward()
        optimiser.step()
    assert all(t.weight[0].abs().sum() == 0 for t in tables)
    assert fields["gender"].embedding.weight[1].abs().sum() > 0


def test_item_embedding_is_shared_and_offset_by_one() -> None:
    m = model("mean", False)
    history = m.user_tower.body.fields[HISTORY]
    assert history.item_embedding is m.item_embedding
    assert m.item_tower.item_embedding is m.item_embedding
    items, item_feats = item_inputs()
    with torch.no_grad():
        before = m.item_tower(items, item_feats)
        m.item_embedding.weight[6] += 1.0  # catalogue row 5 = embedding row 6
        after = m.item_tower(items, item_feats)
    changed = (after - before).abs().amax(dim=1) > 0
    assert changed.tolist() == [False, True, False, False]


def test_logits_are_the_cosines_over_the_models_temperature() -> None:
    m = TwoTower(USER_ENCODER, ITEM_ENCODER, len(ITEM_IDS), TowerConfig(), temperature=0.25)
    cosines = torch.tensor([[1.0, -0.5], [0.0, 0.25]])
    torch.testing.assert_close(m.logits(cosines), torch.tensor([[4.0, -2.0], [0.0, 1.0]]))


def test_mean_history_and_multi_hot_pool_present_values_only() -> None:
    embedding = nn.Embedding(4, 2, padding_idx=0)
    with torch.no_grad():
        embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 6.0], [5.0, -1.0]]))
    history = torch.tensor([[1, 2, 0], [3, 0, 0], [0, 0, 0]])
    expected = torch.tensor([[2.0, 4.0], [5.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(MeanHistory(embedding, 3)(history), expected)
    multi = MultiHotField(4, 2)
    with torch.no_grad():
        multi.embedding.weight.copy_(embedding.weight)
    torch.testing.assert_close(multi(history), expected)


def test_attention_history_reads_order_and_empty_is_zero() -> None:
    torch.manual_seed(1)
    embedding = nn.Embedding(5, 4, padding_idx=0)
    attention = AttentionHistory(embedding, 3)
    with torch.no_grad():
        attention.query.normal_()
        attention.position.normal_()
        out = attention(torch.tensor([[1, 2, 0], [2, 1, 0], [0, 0, 0]]))
        mean = MeanHistory(embedding, 3)(torch.tensor([[1, 2, 0], [2, 1, 0]]))
    assert not torch.allclose(out[0], out[1])  # recency matters
    torch.testing.assert_close(mean[0], mean[1])  # a mean does not read order
    torch.testing.assert_close(out[2], torch.zeros(4))


def test_senet_neutral_gate_is_identity() -> None:
    senet = SENet(n_fields=3)
    last = senet.excite[2]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    fields = torch.randn(2, 3, 4)
    torch.testing.assert_close(senet(fields), fields)


def test_user_tower_needs_an_input() -> None:
    with pytest.raises(ValueError, match="at least one feature"):
        UserTower(FeatureEncoder([]), nn.Embedding(3, 4), TowerConfig())
