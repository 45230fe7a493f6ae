"""The PAD-Rec study: for each trained run (one target per dataset and vocabulary layout), train every draft family
with the same data and epochs, then time them against the autoregressive decoder pair by pair.

    .venv/bin/python benchmarks/padrec_study.py --runs runs/quality/beauty,runs/shared/beauty \\
        [--ablate-runs runs/quality/beauty] [--users 100] [--chain 5] [--tree "5,4,24"] \\
        [--epochs 3] [--max-train 6000] [--threads 1] [--out benchmarks/results/padrec_study.json]

Drafts (saved under each run as `drafts/st-<name>/`, reused when their training settings are unchanged):
    lm            independent 2-layer LM distilled from the target
    eagle         EAGLE head, trained on target features only
    hass          the same head trained over J unrolled steps (HASS)
    padrec-eagle  PAD-Rec module on the EAGLE head, trained like EAGLE
    padrec-hass   PAD-Rec module on the HASS head, trained like HASS
  and, on --ablate-runs, padrec-hass with one part changed: -ipe, -spe, add (no gate), alpha1 (α fixed at 1).

Greedy list-wise generation of 10 items; every speculative configuration is checked token for token against the
AR decoder (column `same`). Results for all runs are merged into one JSON (with the command, commit and machine),
one acceptance plot per run (PAD-Rec vs its base) goes next to it, and the summary table compares each PAD-Rec
draft with its base: Δτ and the wall-clock gain.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

from padrec.drafts.registry import draft_dir, last_dir, list_drafts, load_draft, read_draft_meta
from padrec.drafts.train import DraftTrainConfig, train_draft
from padrec.evaluation.bench import (
    BenchConfig,
    display_rows,
    load_run_results,
    plot_acceptance,
    run_bench,
    save_run_results,
)
from padrec.run import Run
from padrec.speculative.tree import TreeConfig
from padrec.ui import console, table

FAMILIES = {
    "lm": dict(kind="lm"),
    "eagle": dict(kind="eagle"),
    "hass": dict(kind="hass"),
    "padrec-eagle": dict(kind="padrec", padrec_base="eagle"),
    "padrec-hass": dict(kind="padrec", padrec_base="hass"),
}
ABLATIONS = {
    "padrec-hass-ipe": dict(kind="padrec", padrec_base="hass", ipe=False),
    "padrec-hass-spe": dict(kind="padrec", padrec_base="hass", spe=False),
    "padrec-hass-add": dict(kind="padrec", padrec_base="hass", gate=False),
    "padrec-hass-alpha1": dict(kind="padrec", padrec_base="hass", learn_alpha=False),
}
BASE_OF = {"padrec-eagle": "eagle", "padrec-hass": "hass", **{k: "padrec-hass" for k in ABLATIONS}}


def same_settings(saved: dict, cfg: DraftTrainConfig) -> bool:
    """`saved` (a draft.json config) is `cfg`, allowing options added since it was trained if they are at their
    defaults — so a new DraftTrainConfig field does not force retraining every study draft."""
    now, defaults = asdict(cfg), asdict(DraftTrainConfig())
    return all(now.get(k) == v for k, v in saved.items()) and all(
        now[k] == defaults[k] for k in now.keys() - saved.keys())


def ensure_drafts(run: Run, names: list[str], base: DraftTrainConfig) -> dict[str, dict]:
    """Train the drafts that are missing or were trained with other settings; returns name -> training summary."""
    pool: dict = {}
    summary = {}
    for name in names:
        cfg = replace(base, name=f"st-{name}", **{**FAMILIES, **ABLATIONS}[name])
        path = draft_dir(run, cfg.draft_name)
        meta = read_draft_meta(path) if cfg.draft_name in list_drafts(run) else None
        if meta is None or not same_settings(meta.get("config", {}), cfg):
            console.print(f"[bold]{run.path}: training draft {name}[/bold]")
            last = last_dir(run, cfg.draft_name)
            resume = (last / "draft.json").is_file() and read_draft_meta(last).get("config") == asdict(cfg)
            train_draft(run, cfg, resume=resume, feature_pool=pool)
            meta = read_draft_meta(path)
        hist = meta["history"]
        best = max(hist, key=lambda h: h.get("valid_score", h["valid_agreement"]))
        summary[name] = {"epochs": len(hist), "train_s": sum(h["seconds"] for h in hist),
                         "valid_agreement_by_step": best.get("valid_agreement_by_step", [best["valid_agreement"]]),
                         "n_trainable_params": meta.get("n_trainable_params")}
    return summary


def gains(rows: list[dict]) -> list[dict]:
    """Each PAD-Rec draft against its base, configuration by configuration."""
    by = {(r["draft"], r["decoder"]): r for r in rows}
    out = []
    for (draft, decoder), r in by.items():
        base = BASE_OF.get(draft.removeprefix("st-"))
        b = by.get((f"st-{base}", decoder)) if base else None
        if b is None:
            continue
        out.append({"draft": draft, "vs": b["draft"], "decoder": decoder, "τ": round(r["tau"], 3),
                    "τ base": round(b["tau"], 3), "Δτ %": round(100 * (r["tau"] / b["tau"] - 1), 1),
                    "speedup": round(r["speedup"], 3), "base speedup": round(b["speedup"], 3),
                    "wall gain %": round(100 * (r["speedup"] / b["speedup"] - 1), 1)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--ablate-runs", default="")
    ap.add_argument("--drafts", default=",".join(FAMILIES))
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--chain", default="5")
    ap.add_argument("--tree", default="5,4,24")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-train", type=int, default=6000, help="training windows per draft (seeded sample)")
    ap.add_argument("--steps", type=int, default=3, help="unrolled steps of hass / padrec-hass")
    ap.add_argument("--valid-cases", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "padrec_study.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    base = DraftTrainConfig(epochs=a.epochs, max_train_examples=a.max_train, hass_steps=a.steps, threads=a.threads,
                            patience=a.epochs, max_valid_cases=a.valid_cases)
    ablate = set(filter(None, a.ablate_runs.split(",")))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = load_run_results(out)
    for run_dir in filter(None, a.runs.split(",")):
        run = Run(run_dir)
        names = a.drafts.split(",") + (list(ABLATIONS) if run_dir in ablate else [])
        training = ensure_drafts(run, names, base)
        if a.train_only:
            continue
        drafts = {f"st-{n}": load_draft(run, f"st-{n}") for n in names}
        cfg = BenchConfig(users=a.users, warmup=a.warmup, trees=TreeConfig.parse_list(a.chain, a.tree), naive_ar=False,
                          hf_generate=False, hf_assisted=False, prompt_lookup=0)
        res = run_bench(run, drafts, cfg)
        res.update(dataset=run.info.dataset, layout=run.sids.vocab.layout, levels=run.sids.vocab.levels,
                   target=json.loads((run.target_dir / "padrec.json").read_text()).get("preset"),
                   training=training, gains=gains(res["rows"]))
        results[run_dir] = res
        title = f"{run_dir} ({res['dataset']}, {res['layout']} vocabulary): {res['users']} users, {res['threads']} thread(s)"
        console.print(table(display_rows(res["rows"]), title=title))
        console.print(table([{"draft": k, **{kk: (round(vv, 3) if isinstance(vv, float) else vv)
                                             for kk, vv in v.items() if kk != "valid_agreement_by_step"},
                              "valid agree by step": "/".join(f"{x:.3f}" for x in v["valid_agreement_by_step"])}
                             for k, v in training.items()], title="draft training"))
        console.print(table(res["gains"], title="PAD-Rec vs its base"))
        stem = f"padrec_study_{run_dir.strip('/').replace('/', '_')}"
        shown = {**res, "rows": [r for r in res["rows"] if r["draft"] in ("st-hass", "st-padrec-hass", "st-eagle",
                                                                           "st-padrec-eagle")]}
        plot_acceptance(shown, out.parent / f"{stem}.png")
        save_run_results(out, "benchmarks/padrec_study.py", sys.argv[1:], results)
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
