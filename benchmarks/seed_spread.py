"""PAD-Rec against its base averaged over training seeds, from `padrec bench` JSON files:

    .venv/bin/python benchmarks/seed_spread.py benchmarks/results/seed_warm_*.json \\
        benchmarks/results/full_data_*.json [--draft padrec-hass] [--base hass] [--out F.json] [--markdown]

A draft trained with `--seed N` is named `<name>-seed<N>` (benchmarks/seed_warm_padrec.sh); the draft without a
suffix is seed 0. τ of a draft on a run is deterministic (the same test users, greedy lists equal to AR's), so
τ from different files of one run can be pooled; speedups cannot (they are only comparable within one process)
and are left out. For every run and decoder configuration with at least two seeds of both drafts: τ of each
seed, the mean τ of each draft, the difference of the means (Δτ %) and the spread over seeds (sample standard
deviation, % of the mean). A difference of means smaller than the spread is not evidence either way.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from statistics import mean, stdev

from draft_gain import pair_parser
from padrec.evaluation.bench_rows import speculative_rows
from padrec.ui import console, markdown, pyplot, save_figure, table


def seed_of(draft: str, name: str) -> int | None:
    """0 for `name` itself, N for `name-seedN`, None for any other draft."""
    if draft == name:
        return 0
    m = re.fullmatch(re.escape(name) + r"-seed(\d+)", draft)
    return int(m.group(1)) if m else None


def collect(files: list[str]) -> dict[tuple[str, str, str], float]:
    """τ by (run, decoder, draft) over every file; the same draft benched twice must give the same τ."""
    taus: dict[tuple[str, str, str], float] = {}
    for f in files:
        res = json.loads(Path(f).read_text())
        for r in speculative_rows(res["rows"]):
            if r["identical_to_ar"] != f"{res['users']}/{res['users']}":
                raise SystemExit(f"{f}: {r['draft']} {r['decoder']} differs from AR ({r['identical_to_ar']})")
            key = (res["run"], r["decoder"].removeprefix("sd "), r["draft"])
            if key in taus and abs(taus[key] - r["tau"]) > 1e-6 * taus[key]:
                raise SystemExit(f"{f}: τ of {key} is {r['tau']} here and {taus[key]} in an earlier file: "
                                 "were the users or the drafts different?")
            taus[key] = r["tau"]
    return taus


def spread(taus: dict[tuple[str, str, str], float], draft: str, base: str) -> list[dict]:
    by_config: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for (run, decoder, name), tau in taus.items():
        for role, model in (("draft", draft), ("base", base)):
            seed = seed_of(name, model)
            if seed is not None:
                by_config.setdefault((run, decoder), {"draft": {}, "base": {}})[role][seed] = tau
    rows = []
    for (run, decoder), seeds in by_config.items():
        d, b = seeds["draft"], seeds["base"]
        if len(d) < 2 or len(b) < 2:
            continue
        md, mb = mean(d.values()), mean(b.values())
        rows.append({
            "run": run, "decoder": decoder,
            "by seed": {base: b, draft: d},
            f"τ {base} by seed": " ".join(f"{s}:{b[s]:.2f}" for s in sorted(b)),
            f"τ {draft} by seed": " ".join(f"{s}:{d[s]:.2f}" for s in sorted(d)),
            f"mean τ {base}": round(mb, 2), f"mean τ {draft}": round(md, 2),
            "Δτ of means %": round(100 * (md / mb - 1), 1),
            f"spread {base} %": round(100 * stdev(b.values()) / mb, 1),
            f"spread {draft} %": round(100 * stdev(d.values()) / md, 1),
        })
    return rows


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["run"], []).append(r)
    out = []
    for run, g in groups.items():
        gains = [r["Δτ of means %"] for r in g]
        spreads = [v for r in g for k, v in r.items() if k.startswith("spread ")]
        out.append({"run": run, "configs": len(g), "above base": sum(x > 0 for x in gains),
                    "mean Δτ of means %": round(mean(gains), 1), "min %": min(gains), "max %": max(gains),
                    "mean spread %": round(mean(spreads), 1)})
    return out


def main() -> None:
    ap = pair_parser(__doc__)
    ap.add_argument("--out", help="write the rows and the summary as JSON (and a PNG beside it) here")
    a = ap.parse_args()
    rows = spread(collect(a.files), a.draft, a.base)
    if not rows:
        raise SystemExit(f"no configuration has two seeds of both {a.draft!r} and {a.base!r} in {a.files}")
    summ = summary(rows)
    # numbers as rounded above (the table would print four decimals)
    shown = [{k: str(v) for k, v in r.items() if k != "by seed"} for r in rows]
    for title, body in ((f"{a.draft} vs {a.base}, τ over seeds", shown),
                        ("per run", [{k: str(v) for k, v in r.items()} for r in summ])):
        if a.markdown:
            print(f"\n{title}\n\n{markdown(body)}")
        else:
            console.print(table(body, title=title))
    if a.out:
        Path(a.out).write_text(json.dumps({"command": "benchmarks/seed_spread.py " + " ".join(a.files),
                                           "draft": a.draft, "base": a.base, "rows": rows, "summary": summ},
                                          indent=1, ensure_ascii=False))
        png = plot(rows, a.base, a.draft, Path(a.out).with_suffix(".png"))
        console.print(f"written {a.out}" + (f" and {png}" if png else ""))


def plot(rows: list[dict], base: str, draft: str, out: Path) -> Path | None:
    """Per run: τ of every seed of both drafts relative to the base's mean, per configuration, means joined."""
    plt = pyplot()
    runs = list(dict.fromkeys(r["run"] for r in rows))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4), sharey=True, squeeze=False)
    for ax, run in zip(axes[0], runs):
        g = [r for r in rows if r["run"] == run]
        for k, (name, marker, colour) in enumerate(((base, "o", "tab:blue"), (draft, "^", "tab:orange"))):
            means = []
            for i, r in enumerate(g):
                ref = r[f"mean τ {base}"]
                rel = [100 * (t / ref - 1) for t in r["by seed"][name].values()]
                ax.plot([i + 0.1 * (2 * k - 1)] * len(rel), rel, marker, color=colour, alpha=0.6,
                        label=f"{name} (one seed)" if i == 0 else None)
                means.append(100 * (r[f"mean τ {name}"] / ref - 1))
            ax.plot([i + 0.1 * (2 * k - 1) for i in range(len(g))], means, "-", color=colour,
                    label=f"{name} (mean)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(g)), [r["decoder"].split("cal")[0] for r in g], rotation=30, fontsize=7)
        ax.set_title(run, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"τ relative to {base}'s mean over seeds (%)")
    axes[0][0].legend(fontsize=7)
    return save_figure(fig, out)


if __name__ == "__main__":
    main()
