"""Which validation ranks drafts as inference does? Training validation (agreement on each validation user's next
real item, the `valid_score` a draft was selected by) against agreement along the target's own greedy lists
(`padrec list-agreement`), both on validation users, scored against τ measured on test users by `padrec bench`.

    .venv/bin/python benchmarks/list_agreement_vs_tau.py benchmarks/results/full_data_games_small_s6.json ... \\
        [--users 300] [--threads 2] [--out benchmarks/results/list_agreement_vs_tau.json]

For every bench file: the feature drafts it timed (EAGLE, HASS, PAD-Rec; LM drafts have no unrolled steps), both
validation scores of each, and for every pair of drafts of one run and every speculative configuration, whether
each score orders the pair as τ does. Pairs whose τ differ by less than `--tie` percent count as ties and are
left out of the totals. Writes JSON and a scatter plot (PNG) of τ against each score.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

from padrec.drafts.target_lists import list_agreement
from padrec.drafts.kinds import FEATURE_KINDS
from padrec.drafts.registry import draft_dir, read_draft_meta
from padrec.evaluation.bench_rows import speculative_rows
from padrec.provenance import machine_description
from padrec.run import Run
from padrec.files import atomic_write_text
from padrec.ui import console, pyplot, save_figure, table


def bench_entries(path: Path) -> list[dict]:
    """(run, rows) of a `padrec bench` JSON or of a study JSON holding several runs."""
    res = json.loads(path.read_text())
    if "runs" in res:
        return [{"run": run, "rows": r["rows"], "file": path.name} for run, r in res["runs"].items()]
    return [{"run": res["run"], "rows": res["rows"], "file": path.name}]


def sign(x: float, tie: float = 0.0) -> int:
    return 0 if abs(x) <= tie else (1 if x > 0 else -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benches", nargs="+", type=Path)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tie", type=float, default=1.0, help="τ differences below this percent are ties")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/list_agreement_vs_tau.json"))
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG of an existing --out JSON")
    a = ap.parse_args()
    if a.replot:
        console.print(f"written {plot(json.loads(a.out.read_text())['entries'], a.out.with_suffix('.png'))}")
        return

    import torch

    torch.set_num_threads(a.threads)
    entries, pairs = [], []
    for bench in a.benches:
        for e in bench_entries(bench):
            run = Run(e["run"])
            timed = [n for n in dict.fromkeys(r["draft"] for r in e["rows"] if r["draft"] != "-")]
            gone = [n for n in timed if not draft_dir(run, n).is_dir()]
            if gone:
                console.print(f"[yellow]{e['file']}: {e['run']} no longer holds {', '.join(gone)}; left out[/]")
            names = [n for n in timed if n not in gone and read_draft_meta(draft_dir(run, n))["kind"] in FEATURE_KINDS]
            if len(names) < 2:
                continue
            scores = {r["draft"]: r for r in list_agreement(run, names, users=a.users, steps=a.steps)}
            taus = {(r["decoder"].removeprefix("sd "), r["draft"]): r["tau"] for r in speculative_rows(e["rows"])
                    if r["draft"] in scores}
            configs = list(dict.fromkeys(c for c, _ in taus))
            entries.append({**e, "drafts": names, "scores": scores, "configs": configs,
                            "tau": {c: {n: taus[(c, n)] for n in names if (c, n) in taus} for c in configs}})
            for x, y in combinations(names, 2):
                for c in configs:
                    if (c, x) not in taus or (c, y) not in taus:
                        continue
                    d_tau = 100 * (taus[(c, x)] / taus[(c, y)] - 1)
                    s_tau = sign(d_tau, a.tie)
                    pairs.append({
                        "run": e["run"], "file": e["file"], "config": c, "pair": f"{x} vs {y}", "Δτ %": round(d_tau, 2),
                        "list agrees": None if s_tau == 0 else sign(scores[x]["mean"] - scores[y]["mean"]) == s_tau,
                        "training agrees": None if s_tau == 0 else
                        sign(scores[x]["train_valid_score"] - scores[y]["train_valid_score"]) == s_tau,
                    })

    rows = []
    for e in entries:
        for n in e["drafts"]:
            s = e["scores"][n]
            rows.append({"run": e["run"], "draft": n, "list agreement (mean of steps)": round(s["mean"], 4),
                         "training valid score": round(s["train_valid_score"], 4),
                         **{f"τ {c}": e["tau"][c].get(n) for c in e["configs"][:4]}})
    console.print(table(rows, title=f"validation scores ({a.users} valid users' greedy lists) and τ (test users)"))
    decided = [p for p in pairs if p["list agrees"] is not None]
    summary = {
        "pairs (draft pair x configuration)": len(pairs),
        f"decided (|Δτ| > {a.tie}%)": len(decided),
        "ordered as τ by list agreement": sum(p["list agrees"] for p in decided),
        "ordered as τ by training validation": sum(p["training agrees"] for p in decided),
    }
    console.print(table([summary], title="does the score order two drafts as their τ does?"))
    wrong = [{**p, "list agrees": "yes" if p["list agrees"] else "no",
              "training agrees": "yes" if p["training agrees"] else "no"}
             for p in decided if not p["list agrees"] or not p["training agrees"]]
    if wrong:
        console.print(table(wrong, title="pairs at least one score orders against τ"))
    result = {"users": a.users, "steps": a.steps, "tie_percent": a.tie, "summary": summary, "rows": rows,
              "pairs": pairs, "entries": entries, "machine": machine_description(),
              "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv])}
    atomic_write_text(a.out, json.dumps(result, indent=2))
    png = plot(entries, a.out.with_suffix(".png"))
    console.print(f"written {a.out}" + (f" and {png}" if png else ""))


def plot(entries: list[dict], out: Path) -> Path | None:
    """τ at each run's first chain configuration against either score, one colour per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=False)
    colours = plt.cm.tab20.colors
    for i, e in enumerate(entries):
        chains = [c for c in e["configs"] if c.startswith("chain")]
        if not chains:
            continue
        c = chains[0]
        names = [n for n in e["drafts"] if n in e["tau"][c]]
        base = e["tau"][c][names[0]]
        label = f"{e['run']} ({c})"
        for ax, key in zip(axes, ("mean", "train_valid_score")):
            xs = [e["scores"][n][key] for n in names]
            ys = [100 * (e["tau"][c][n] / base - 1) for n in names]
            ax.plot(xs, ys, "os^D"[i % 4], color=colours[i % len(colours)], label=label)
    axes[0].set_xlabel("agreement along the target's greedy lists (mean of steps)")
    axes[1].set_xlabel("training validation score (next real item)")
    for ax in axes:
        ax.set_ylabel("τ relative to the run's first draft (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return save_figure(fig, out)


if __name__ == "__main__":
    main()
