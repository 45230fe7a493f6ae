"""What PAD-Rec's step position embedding should do at draft depths its training never unrolled: an inference-only
probe, no retraining.

    .venv/bin/python benchmarks/spe_depth_probe.py --run runs/quality/games [--draft padrec-hass] [--base hass] \\
        [--chain 6,10,16] [--users 100] [--out benchmarks/results/spe_depth_probe_games.json]

A draft trained over J unrolled steps has step embeddings for depths 0..J-1 only. The shipped rule reuses the
deepest one beyond that (`PositionModule`). This script benches the same weights with other rules for the untrained
depths, next to the base draft, in one process on the same users:

    clamp   E_step[min(depth, J-1)]          the shipped rule
    zero    no step embedding beyond J-1     (the gate then admits nothing)
    row0    E_step[0], the embedding of a target feature

τ and acceptance by depth are exact counts (timing is printed but is not the point). Every list is checked
against the AR decoder's.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

from padrec.drafts.eagle import EagleDraft
from padrec.drafts.registry import load_draft
from padrec.evaluation.bench import BenchConfig, run_bench, save_run_results
from padrec.evaluation.bench_rows import speculative_rows
from padrec.run import Run
from padrec.speculative.tree import TreeConfig
from padrec.ui import console, table

RULES = ("clamp", "zero", "row0")


def with_rule(draft: EagleDraft, rule: str) -> EagleDraft:
    """A copy of a PAD-Rec draft that applies `rule` (see the module doc) at every depth past the trained ones. One
    extra row suffices: sessions clamp a depth to the last row of the table. Depths do run past the chain length:
    the previous round's bonus and forced tokens enter the draft as a speculative chain below the new tree
    (`speculative/decoder.py`)."""
    if rule == "clamp":
        return draft
    model = copy.deepcopy(draft.model)
    rows = model.position.step_embed.weight.detach()
    fill = torch.zeros(1, rows.shape[1]) if rule == "zero" else rows[:1]
    model.position.step_embed = nn.Embedding.from_pretrained(torch.cat([rows, fill], 0), freeze=True)
    out = EagleDraft(model, name=f"{draft.name}:{rule}")
    out.acceptance = draft.acceptance
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--draft", default="padrec-hass")
    ap.add_argument("--base", default="hass")
    ap.add_argument("--chain", default="6,10,16")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = Run(a.run)
    chains = [int(x) for x in a.chain.split(",")]
    pad = load_draft(run, a.draft)
    if not hasattr(pad.model, "position") or not pad.model.position.cfg.spe:
        raise SystemExit(f"{a.draft!r} is not a PAD-Rec draft with a step position embedding")
    trained = pad.model.position.cfg.trained_depths
    drafts = {a.base: load_draft(run, a.base)}
    drafts.update({f"{a.draft}:{rule}": with_rule(pad, rule) for rule in RULES})
    cfg = BenchConfig(users=a.users, warmup=2, naive_ar=False, hf_generate=False, hf_assisted=False, prompt_lookup=0,
                      trees=[TreeConfig.chain(g) for g in chains])
    res = run_bench(run, drafts, cfg)
    res.update(run=str(run.path), dataset=run.info.dataset, trained_depths=trained)
    rows = [{"draft": r["draft"], "decoder": r["decoder"].removeprefix("sd "), "τ": round(r["tau"], 3),
             "speedup": round(r["speedup"], 2), "all = AR": r["identical_to_ar"],
             f"acceptance by depth (| after depth {trained})": "{} | {}".format(
                 " ".join(f"{x:.2f}" for x in r["accept_by_depth"][:trained] if x is not None),
                 " ".join(f"{x:.2f}" for x in r["accept_by_depth"][trained:] if x is not None))}
            for r in speculative_rows(res["rows"])]
    rows.sort(key=lambda r: (int(r["decoder"].removeprefix("chain")), r["draft"]))
    console.print(table(rows, title=f"{run.path}: step embedding beyond trained depth {trained - 1}"))
    if a.out:
        save_run_results(Path(a.out), "benchmarks/spe_depth_probe.py", sys.argv[1:], {str(run.path): res})


if __name__ == "__main__":
    main()
