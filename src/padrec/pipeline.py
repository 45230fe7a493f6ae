"""The steps of a run, as functions the CLI and the demo share: tokenize, train, evaluate, report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from padrec.baselines.evaluate import baseline_rows, default_dir
from padrec.data.dataset import load_dataset
from padrec.evaluation.evaluate import RankConfig, evaluate_cases
from padrec.files import atomic_write_text
from padrec.provenance import machine_description
from padrec.run import Run
from padrec.tokenizer.build import (
    TokenizerConfig,
    build_semantic_ids,
    format_tokenizer_report,
)
from padrec.training import distributed as dist
from padrec.ui import console, pyplot, save_figure, table


def cache_dir() -> Path:
    return Path(os.environ.get("PADREC_CACHE_DIR", Path.home() / ".cache" / "padrec"))


def tokenize(run_dir: Path, dataset: str, cfg: TokenizerConfig, max_history: int = 20) -> Run:
    ds = load_dataset(dataset)
    sids = build_semantic_ids(ds, cfg, cache_dir=cache_dir() / "embeddings", console=console)
    console.print(format_tokenizer_report(sids))
    return Run.create(run_dir, dataset, asdict(cfg), sids, max_history=max_history)


def evaluate(run: Run, split: str, configs: list[RankConfig], limit: int | None = None, progress: bool = True,
             model=None, baselines_dir: Path | None = None) -> dict:
    """The target's rows for each configuration, and the baselines' rows (MostPop; SASRec when trained in
    `baselines_dir`, default runs/baselines/<dataset>) on the same users."""
    model = (model or run.load_target()).to(dist.device())
    cases = run.dataset.eval_cases(split, max_history=run.info.max_history)
    if limit:
        cases = cases[:limit]
    # under torchrun each rank decodes its share of the users and every rank gets all the rankings back
    rows = [evaluate_cases(model, run, cases, cfg, progress) for cfg in configs]
    base_dir = Path(baselines_dir) if baselines_dir is not None else default_dir(run.info.dataset)
    baselines = baseline_rows(run.dataset, split, limit, base_dir / "sasrec")
    result = {"run": str(run.path), "dataset": run.info.dataset, "split": split, "results": rows,
              "baselines": baselines,
              "machine": {**machine_description(),
                          **({"processes": dist.world_size()} if dist.world_size() > 1 else {})},
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = run.results_dir / f"eval_{split}.json"
    if dist.is_main():
        atomic_write_text(out, json.dumps(result, indent=2))
        console.print(metrics_table(rows + baselines, title=f"{run.info.dataset} — {split} ({len(cases)} users)"))
        console.print(f"results written to {out}")
    return result


def metrics_table(rows: list[dict], title: str):
    shown = []
    for r in rows:
        if r["mode"] == "baseline":
            label = r["label"]
        elif r["mode"] == "beam":
            label = f"beam{r['config']['beam_size']}"
        else:
            label = f"list{r['config']['n_items']}" + (" sampled" if r["config"]["do_sample"] else "")
        row = {"mode": label}
        for k in (5, 10, 20):
            for m in ("recall", "ndcg"):
                if f"{m}@{k}" in r:
                    row[f"{'Recall' if m == 'recall' else 'NDCG'}@{k}"] = r[f"{m}@{k}"]
        row["ms/user"] = r["ms_per_user"]
        shown.append(row)
    return table(shown, title=title)


def plot_training_curve(run: Run) -> Path | None:
    hist_file = run.path / "train_history.json"
    if not hist_file.is_file():
        return None
    plt = pyplot()
    hist = json.loads(hist_file.read_text())
    epochs = [h["epoch"] for h in hist]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in hist], marker="o", label="train loss (SID tokens)")
    ax.plot(epochs, [h["valid_loss"] for h in hist], marker="s", label="validation loss (next item)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy per token")
    ax.set_title(f"target training — {run.info.dataset}")
    ax.grid(alpha=0.3)
    ax.legend()
    out = run.results_dir / "training_curve.png"
    return save_figure(fig, out)
