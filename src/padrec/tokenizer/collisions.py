"""Making every item's semantic ID unique: an extra disambiguation level (TIGER) or last-level reassignment."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from padrec import PadrecError


def _as_codes(codes) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2:
        raise PadrecError(f"codes must be a [items, levels] matrix, got shape {codes.shape}")
    return codes


def collision_stats(codes) -> dict:
    """distinct_ids, items_sharing_id (items whose ID is also another item's), max_group_size."""
    codes = _as_codes(codes)
    if codes.shape[0] == 0:
        return {"items": 0, "distinct_ids": 0, "items_sharing_id": 0, "colliding_ids": 0, "max_group_size": 0}
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return {
        "items": int(codes.shape[0]),
        "distinct_ids": int(counts.size),
        "items_sharing_id": int(counts[counts > 1].sum()),
        "colliding_ids": int((counts > 1).sum()),
        "max_group_size": int(counts.max()),
    }


def add_disambiguation_level(codes) -> np.ndarray:
    """Append a level: the item's rank (in item order) among the items with the same code tuple.

    Unique items get 0. The new level's codebook size is the largest group size (>= 1).
    """
    codes = _as_codes(codes)
    seen: dict[tuple, int] = defaultdict(int)
    extra = np.zeros(codes.shape[0], dtype=np.int64)
    for i, row in enumerate(map(tuple, codes.tolist())):
        extra[i] = seen[row]
        seen[row] += 1
    return np.concatenate([codes, extra[:, None]], axis=1)


def reassign_last_level(codes, codebook_size) -> np.ndarray:
    """Resolve collisions keeping L levels: of the items sharing a full ID the lowest item id keeps it,
    each other one moves to the free last-level code under the same prefix that is nearest to its own
    (by |difference|, ties to the lower code). Items are handled in item-id order.

    codebook_size: the last level's size (an int, or a sequence of per-level sizes whose last is used).
    Raises PadrecError when a prefix has no free code left.
    """
    codes = _as_codes(codes).copy()
    size = int(codebook_size if np.isscalar(codebook_size) else list(codebook_size)[-1])
    if codes.shape[0] == 0:
        return codes
    last = codes[:, -1]
    if last.min() < 0 or last.max() >= size:
        raise PadrecError(f"last-level codes must lie in [0, {size}), found {last.min()}..{last.max()}")
    occupied: dict[tuple, set[int]] = defaultdict(set)
    prefixes = [tuple(r) for r in codes[:, :-1].tolist()]
    for p, c in zip(prefixes, last.tolist()):
        occupied[p].add(c)
    holder: set[tuple] = set()
    for i, (p, c) in enumerate(zip(prefixes, last.tolist())):
        full = p + (c,)
        if full not in holder:
            holder.add(full)
            continue
        taken = occupied[p]
        if len(taken) >= size:
            raise PadrecError(
                f"cannot make item {i}'s semantic ID unique: all {size} last-level codes under prefix "
                f"{list(p)} are taken"
            )
        for dist in range(1, size):
            new = next((x for x in (c - dist, c + dist) if 0 <= x < size and x not in taken), None)
            if new is not None:
                break
        taken.add(new)
        holder.add(p + (new,))
        codes[i, -1] = new
    return codes
