"""What the quality benchmark measures against: the splits' protocols, the metrics, issue 19's
targets and the published figures shown beside them."""

from __future__ import annotations

from models.splits import is_next_item

DEFAULT_SPLITS = "leave-last-n:1,last-10pct,seed-2003"
PROTOCOLS = {  # spec -> (name, what it answers)
    "leave-last-n": (
        "next-item",
        "each user's last {n} held out: the literature's protocol for sequential models",
    ),
    "last-10pct": (
        "global time split",
        "the last 10 % of the log by time, users seen before the cut: closest to production",
    ),
    "seed-2003": (
        "seed experiment's time cut",
        "everything from 2003-01-01 on, users seen before it: the protocol this project grew from",
    ),
}
METRICS = (
    *("recall@10", "recall@50", "recall@100", "ndcg@10", "ndcg@50"),
    *("hit_rate@10", "hit_rate@50", "pooled_recall@50"),
)
TABLE_METRICS = ("recall@10", "recall@50", "ndcg@10", "ndcg@50", "pooled_recall@50")
# Issue 19's targets: (metric, baseline: "ease" or the best baseline on that metric, ratio).
TARGETS = {
    "leave-last-n:1": (("recall@10", "ease", 2.5), ("ndcg@10", "ease", 2.5)),
    "last-10pct": (
        ("recall@10", "best baseline", 1.15),
        ("recall@50", "best baseline", 1.0),
        ("pooled_recall@50", "best baseline", 1.0),
    ),
}
MAX_TRAIN_SECONDS = 1800.0  # per run (one seed of one split), on the 2-core CPU machine
# Published next-item figures on the full ML-1M (6,040 users; leave-one-out, full ranking),
# shown beside `leave-last-n:1` for orientation only: our data is ML-1M users 1-2999, so they
# are not comparable one-to-one. Issue 19's 2.5x EASE target is about where they lie.
# - Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018 (SASRec, sampled
#   softmax), as re-evaluated with full ranking by the two papers below;
# - Petrov & Macdonald, "gSASRec: Reducing Overconfidence in Sequential Recommendation Trained
#   with Negative Sampling", RecSys 2023;
# - Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better than
#   SASRec?", RecSys 2023 (SASRec with full cross-entropy).
PUBLISHED_NEXT_ITEM = (
    {
        "name": "SASRec, sampled softmax (Kang & McAuley 2018, re-evaluated with full ranking)",
        "hit_rate@10": [0.285, 0.285],
        "ndcg@10": None,
    },
    {
        "name": "gSASRec / SASRec with full cross-entropy "
        "(Petrov & Macdonald 2023; Klenitskiy & Vasilev 2023)",
        "hit_rate@10": [0.30, 0.315],
        "ndcg@10": [0.16, 0.18],
    },
)
# The seed experiment this project grew from (MovieLens-1M, seed-2003, seen items kept).
SEED_EXPERIMENT = {"two_tower_recall@50": [0.052, 0.071], "itemcf_recall@50": 0.057}


def known_split(spec: str) -> bool:
    return spec in PROTOCOLS or is_next_item(spec)


def protocol(spec: str) -> dict[str, str]:
    """What the split is and which question it answers."""
    if is_next_item(spec):
        name, description = PROTOCOLS["leave-last-n"]
        n = int(spec.split(":")[1])
        held_out = "interaction" if n == 1 else f"{n} interactions"
        return {"name": name, "description": description.format(n=held_out)}
    name, description = PROTOCOLS[spec]
    return {"name": name, "description": description}
