"""The steps of a run, as functions the CLI and the demo share: tokenize, train, evaluate, report."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import torch

from padrec.data.dataset import load_dataset
from padrec.evaluation.evaluate import RankConfig, evaluate_cases
from padrec.run import Run
from padrec.tokenizer.build import TokenizerConfig, build_semantic_ids, format_tokenizer_report
from padrec.tokenizer.semantic_ids import atomic_write_text
from padrec.ui import console, pyplot, save_figure, table


def cache_dir() -> Path:
    return Path(os.environ.get("PADREC_CACHE_DIR", Path.home() / ".cache" / "padrec"))


def tokenize(run_dir: Path, dataset: str, cfg: TokenizerConfig, max_history: int = 20) -> Run:
    ds = load_dataset(dataset)
    sids = build_semantic_ids(ds, cfg, cache_dir=cache_dir() / "embeddings", console=console)
    console.print(format_tokenizer_report(sids))
    return Run.create(run_dir, dataset, asdict(cfg), sids, max_history=max_history)


def machine_description() -> dict:
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=5).stdout.strip() or None
        # a copy with edits on top of HEAD (a device's working tree, a benchmark of uncommitted code) must not pass
        # for HEAD itself
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, cwd=here, timeout=5).stdout.strip()
        if commit and changed:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit}


def device_name(device: str) -> str:
    """'cpu', or e.g. 'cuda (NVIDIA H100 80GB HBM3)': benchmark JSON says which chip gave its timings."""
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device


def evaluate(run: Run, split: str, configs: list[RankConfig], limit: int | None = None, progress: bool = True,
             model=None) -> dict:
    from padrec.training import distributed as dist

    model = (model or run.load_target()).to(dist.device())
    cases = run.dataset.eval_cases(split, max_history=run.info.max_history)
    if limit:
        cases = cases[:limit]
    # under torchrun each rank decodes its share of the users and every rank gets all the rankings back
    rows = [evaluate_cases(model, run, cases, cfg, progress) for cfg in configs]
    result = {"run": str(run.path), "dataset": run.info.dataset, "split": split, "results": rows,
              "machine": {**machine_description(),
                          **({"processes": dist.world_size()} if dist.world_size() > 1 else {})},
              "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = run.results_dir / f"eval_{split}.json"
    if dist.is_main():
        atomic_write_text(out, json.dumps(result, indent=2))
        console.print(metrics_table(rows, title=f"{run.info.dataset} — {split} ({len(cases)} users)"))
        console.print(f"results written to {out}")
    return result


def metrics_table(rows: list[dict], title: str):
    shown = []
    for r in rows:
        label = f"beam{r['config']['beam_size']}" if r["mode"] == "beam" else f"list{r['config']['n_items']}" + (
            " sampled" if r["config"]["do_sample"] else "")
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
