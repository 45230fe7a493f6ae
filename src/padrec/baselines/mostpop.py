"""MostPop: every user gets the items most often interacted with before the evaluated period.

`window="history"`: counts over everything the queries' histories may hold (train for the valid split; train +
valid for the test split). `window="previous"` (time protocol only): counts over the period just before the
evaluated one, i.e. the validation period for the test split; under a global time split what is popular lately
predicts the next period better than all-time counts. Ties rank by item id.
"""

from __future__ import annotations

from collections import Counter

from padrec import PadrecError
from padrec.data.dataset import Dataset

WINDOWS = ("history", "previous")


def popularity(dataset: Dataset, split: str, window: str = "history") -> list[int]:
    """All items, most popular first (ties: smaller id), by the counts of `window` before `split`."""
    if window not in WINDOWS:
        raise PadrecError(f"unknown popularity window {window!r}: expected one of {', '.join(WINDOWS)}")
    counts: Counter[int] = Counter()
    for u in dataset.users:
        if window == "previous":
            if dataset.protocol != "time" or split != "test":
                raise PadrecError("window 'previous' is the validation period: it needs the time protocol and the "
                                  "test split")
            counts.update(u.valid)
        else:
            counts.update(u.train if split == "valid" else u.train + u.valid)
    return sorted(range(dataset.num_items), key=lambda i: (-counts[i], i))


def rank_most_popular(dataset: Dataset, split: str, n_users: int, k: int, window: str = "history") -> list[list[int]]:
    """The same top-k for each of `n_users` queries."""
    top = popularity(dataset, split, window)[:k]
    return [list(top) for _ in range(n_users)]
