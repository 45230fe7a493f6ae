"""Top-K ranking metrics with multi-item targets (Beauty/Games test targets are sets)."""

from __future__ import annotations

import math
from collections.abc import Sequence

KS = (5, 10, 20)


def recall_at_k(ranked: Sequence[int], targets: Sequence[int], k: int) -> float:
    """Share of the target items found in the first k recommendations."""
    t = set(targets)
    if not t:
        raise ValueError("recall needs at least one target item")
    return len(t.intersection(ranked[:k])) / len(t)


def ndcg_at_k(ranked: Sequence[int], targets: Sequence[int], k: int) -> float:
    """Binary-relevance NDCG: DCG of the hits in the first k over the DCG of an ideal list that puts
    min(|targets|, k) hits first."""
    t = set(targets)
    if not t:
        raise ValueError("NDCG needs at least one target item")
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(ranked[:k]) if item in t)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(t), k)))
    return dcg / idcg


def ranking_metrics(rankings: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], ks=KS) -> dict[str, float]:
    """Mean Recall@k and NDCG@k over users. A K larger than a ranked list counts missing slots as misses."""
    if len(rankings) != len(targets):
        raise ValueError(f"{len(rankings)} rankings but {len(targets)} target sets")
    if not rankings:
        raise ValueError("no users to evaluate")
    out = {}
    for k in ks:
        out[f"recall@{k}"] = sum(recall_at_k(r, t, k) for r, t in zip(rankings, targets)) / len(rankings)
        out[f"ndcg@{k}"] = sum(ndcg_at_k(r, t, k) for r, t in zip(rankings, targets)) / len(rankings)
    return out
