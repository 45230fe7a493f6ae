"""Recall/NDCG of the `small` target on every bundled dataset, beam (20) and list-wise greedy (10) modes.

    .venv/bin/python benchmarks/target_quality.py [--datasets beauty,games,toys,yelp] [--budget-min 8]
        [--limit-users N] [--runs-dir runs/quality]

Each dataset: tokenize (RQ-KMeans 3x256 + disambiguation level), train the target under a time budget with early
stopping, evaluate on the test split. Prints a table and writes benchmarks/results/target_quality.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from padrec.evaluation.evaluate import RankConfig
from padrec.pipeline import evaluate, plot_training_curve, tokenize
from padrec.provenance import machine_description
from padrec.run import Run
from padrec.tokenizer.build import TokenizerConfig
from padrec.files import atomic_write_text
from padrec.training.target_trainer import TrainConfig, train_target
from padrec.ui import console, table

OUT = Path(__file__).parent / "results" / "target_quality.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="beauty,games,toys,yelp")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--budget-min", type=float, default=8.0, help="training time budget per dataset")
    ap.add_argument("--limit-users", type=int, default=None, help="beam mode: evaluate only the first N test users")
    ap.add_argument("--list-limit-users", type=int, default=None, help="list mode: only the first N test users")
    ap.add_argument("--runs-dir", default="runs/quality")
    a = ap.parse_args()

    rows, details = [], {}
    if OUT.is_file():
        details = json.loads(OUT.read_text()).get("datasets", {})
    for name in a.datasets.split(","):
        run_dir = Path(a.runs_dir) / name
        t0 = time.time()
        run = Run(run_dir) if (run_dir / "run.json").is_file() else tokenize(run_dir, name, TokenizerConfig())
        tok_s = time.time() - t0
        train = train_target(run, TrainConfig(preset=a.preset, epochs=30, time_budget_min=a.budget_min))
        plot_training_curve(run)
        model = run.load_target()
        res = evaluate(run, "test", [RankConfig(mode="beam", beam_size=20)], limit=a.limit_users, model=model)
        res_list = evaluate(run, "test", [RankConfig(mode="list", n_items=10)], limit=a.list_limit_users, model=model)
        details[name] = {"run": str(run_dir), "tokenize_seconds": tok_s, "train": train,
                         "test": res["results"] + res_list["results"]}
        atomic_write_text(OUT, json.dumps({"command": "benchmarks/target_quality.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if v is not None),
            "machine": machine_description(), "datasets": details}, indent=2))

    for name, d in details.items():
        for r in d["test"]:
            rows.append({
                "dataset": name, "mode": "beam20 top-10" if r["mode"] == "beam" else "list10 greedy",
                "users": r["users"], "Recall@5": r["recall@5"], "Recall@10": r["recall@10"],
                "NDCG@5": r["ndcg@5"], "NDCG@10": r["ndcg@10"], "epochs": len(d["train"]["history"]),
                "train min": round(d["train"]["train_seconds"] / 60, 1), "ms/user": round(r["ms_per_user"], 1),
            })
    console.print(table(rows, title=f"target quality ({a.preset} preset), test split"))
    console.print(f"written to {OUT}")


if __name__ == "__main__":
    main()
