"""Batch-1 speculative-decoding speed on trained runs: train the drafts if missing, then bench AR vs SD.

    .venv/bin/python benchmarks/sd_speed.py --runs runs/quality/beauty,runs/quality/toys [--drafts eagle,lm]
        [--users 100] [--chain 3,5] [--tree "5,4,16;6,6,32"] [--draft-budget-min 5] [--threads 1]
        [--out benchmarks/results/sd_speed.json]

Per run it prints the table of `padrec bench` and writes all rows (with the command, commit and machine) to one
JSON file, merged with what is already there, so datasets can be added one at a time, then a summary: one row
per run with both AR decoders and the fastest speculative configuration (`--out F` without `--runs` prints only
the summary of F).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from padrec.drafts.registry import list_drafts, load_draft
from padrec.drafts.train import DraftTrainConfig, train_draft
from padrec.evaluation.bench import (
    BenchConfig,
    display_rows,
    load_run_results,
    plot_acceptance,
    run_bench,
    save_run_results,
)
from padrec.evaluation.bench_rows import speculative_rows
from padrec.run import Run
from padrec.speculative.tree import TreeConfig
from padrec.ui import console, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="", help="comma-separated run dirs (none: only print the summary of --out)")
    ap.add_argument("--drafts", default="eagle,lm")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--chain", default="3,5")
    ap.add_argument("--tree", default="5,4,16;6,6,32")
    ap.add_argument("--draft-epochs", type=int, default=4)
    ap.add_argument("--draft-budget-min", type=float, default=6.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sd_speed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    out = Path(a.out)
    results = load_run_results(out)
    for run_dir in [r for r in a.runs.split(",") if r]:
        run = Run(run_dir)
        have = list_drafts(run)
        drafts = {}
        for kind in a.drafts.split(","):
            if kind not in have:
                train_draft(run, DraftTrainConfig(kind=kind, epochs=a.draft_epochs, time_budget_min=a.draft_budget_min,
                                                  threads=a.threads))
            drafts[kind] = load_draft(run, kind)
        cfg = BenchConfig(users=a.users, warmup=a.warmup, trees=TreeConfig.parse_list(a.chain, a.tree), naive_ar=not a.no_naive,
                          hf_generate=not a.no_hf, hf_assisted=not a.no_hf, prompt_lookup=0 if a.no_hf else 10)
        res = run_bench(run, drafts, cfg)
        res["target"] = json.loads((run.target_dir / "padrec.json").read_text()).get("preset")
        res["dataset"] = run.info.dataset
        key = str(run_dir)
        results[key] = res
        shown = display_rows(res["rows"])
        console.print(table(shown, title=f"{key}: batch-1 list-wise greedy, {res['users']} users, "
                                         f"{res['threads']} thread(s)"))
        plot_acceptance(res, out.parent / f"{out.stem}_{str(run_dir).strip('/').replace('/', '_')}.png")
        save_run_results(out, "benchmarks/sd_speed.py", sys.argv[1:], results)
    console.print(table(summary_rows(results), title="per run: AR decoders and the fastest speculative configuration"))
    console.print(f"written to {out}")


def _preset_label(preset) -> str | None:
    if isinstance(preset, dict):
        return f"{preset.get('layers')}x{preset.get('hidden')}"
    return preset


def summary_rows(results: dict) -> list[dict]:
    """One row per run: our AR decoder, the same decoder with the target through Hugging Face, and the speculative
    configuration with the best median speedup (τ, latency, speedup against both, equality with AR, Recall/NDCG)."""
    out = []
    for key, res in results.items():
        rows = {r["decoder"] + "/" + r["draft"]: r for r in res["rows"]}
        ar = rows["ar/-"]
        ar_hf = rows.get("ar-hf/-")
        sd = speculative_rows(res["rows"])
        if not sd:
            continue
        best = max(sd, key=lambda r: r["speedup"])
        out.append({
            "run": key, "target": _preset_label(res.get("target")), "threads": res.get("threads"),
            "AR ms": round(ar["median_ms"], 1), "AR-hf ms": round(ar_hf["median_ms"], 1) if ar_hf else None,
            "best SD": f"{best['decoder'].removeprefix('sd ')} ({best['draft']})", "τ": round(best["tau"], 2),
            "SD ms": round(best["median_ms"], 1), "speedup": round(best["speedup"], 2),
            "vs AR-hf": round(ar_hf["median_ms"] / best["median_ms"], 2) if ar_hf else None,
            "same": best["identical_to_ar"], "R@10": round(ar["recall@10"], 4), "N@10": round(ar["ndcg@10"], 4),
        })
    return out


if __name__ == "__main__":
    main()
