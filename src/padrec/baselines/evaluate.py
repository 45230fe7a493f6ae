"""The baselines' rows for a quality table, in the shape of `evaluation.evaluate.evaluate_cases`'s rows (same users,
targets and metrics as the target's): MostPop always (it costs nothing), MostPop over the previous period under the
time protocol, and SASRec when one was trained for the dataset."""

from __future__ import annotations

import time
from pathlib import Path

from padrec.baselines.mostpop import rank_most_popular
from padrec.baselines.sasrec import load_sasrec, rank
from padrec.data.dataset import Dataset
from padrec.metrics import KS, ranking_metrics

LIST_LENGTH = max(KS)


def default_dir(dataset: str) -> Path:
    """Where `padrec baseline` keeps a dataset's baselines, and where `padrec evaluate` looks for them."""
    return Path("runs") / "baselines" / dataset


def _row(label: str, rankings: list[list[int]], cases, seconds: float, config: dict) -> dict:
    return {"mode": "baseline", "label": label, "config": config, "users": len(cases), "seconds": seconds,
            "ms_per_user": 1000 * seconds / max(1, len(cases)),
            **ranking_metrics(rankings, [c.targets for c in cases], KS)}


def baseline_rows(dataset: Dataset, split: str, limit: int | None = None, sasrec_dir: Path | None = None) -> list[dict]:
    """MostPop (and MostPop of the previous period, time protocol, test split), and SASRec if `sasrec_dir` holds
    one trained on `dataset`, on the split's queries (the first `limit` users if given)."""
    cases = dataset.eval_cases(split)[:limit] if limit else dataset.eval_cases(split)
    windows = ["history"] + (["previous"] if dataset.protocol == "time" and split == "test" else [])
    rows = []
    for window in windows:
        t0 = time.time()
        ranked = rank_most_popular(dataset, split, len(cases), LIST_LENGTH, window)
        label = "MostPop" if window == "history" else "MostPop (valid period)"
        rows.append(_row(label, ranked, cases, time.time() - t0, {"window": window}))
    if sasrec_dir is not None and (Path(sasrec_dir) / "sasrec.json").is_file():
        model, meta = load_sasrec(sasrec_dir, dataset)
        t0 = time.time()
        ranked = rank(model, [c.history for c in cases], LIST_LENGTH)
        rows.append(_row("SASRec", ranked, cases, time.time() - t0, {**meta["config"], "path": str(sasrec_dir),
                                                                     "epoch": meta["epoch"]}))
    return rows
