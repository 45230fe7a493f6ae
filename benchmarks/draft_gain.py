"""One draft against another, per configuration, from `padrec bench` JSON files (one per run):

    .venv/bin/python benchmarks/draft_gain.py benchmarks/results/full_data_*.json [--draft padrec-hass] \\
        [--base hass] [--markdown]

For every run and decoder configuration timed with both drafts: τ of each, Δτ %, each speedup over AR and the
wall-clock gain % (ratio of the two speedups, each a median of per-user AR/SD ratios from the same process), and
whether every list equals AR's. Ends with the mean gains per run and over everything.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from padrec.evaluation.bench_rows import speculative_rows
from padrec.ui import console, markdown, table


def gains(res: dict, draft: str, base: str) -> list[dict]:
    rows = {(r["decoder"], r["draft"]): r for r in res["rows"]}
    ar = rows[("ar", "-")]
    out = []
    for decoder in dict.fromkeys(r["decoder"] for r in speculative_rows(res["rows"])):
        a, b = rows.get((decoder, draft)), rows.get((decoder, base))
        if a is None or b is None:
            continue
        out.append({
            "run": res["run"], "decoder": decoder.removeprefix("sd "),
            "AR ms": round(ar["median_ms"], 1),
            f"τ {base}": round(b["tau"], 2), f"τ {draft}": round(a["tau"], 2),
            "Δτ %": round(100 * (a["tau"] / b["tau"] - 1), 1),
            f"speedup {base}": round(b["speedup"], 2), f"speedup {draft}": round(a["speedup"], 2),
            "wall gain %": round(100 * (a["speedup"] / b["speedup"] - 1), 1),
            "all = AR": "yes" if a["identical_to_ar"] == b["identical_to_ar"] == f"{res['users']}/{res['users']}"
            else f"{draft} {a['identical_to_ar']}, {base} {b['identical_to_ar']}",
        })
    return out


def summary(rows: list[dict]) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["run"], []).append(r)
    groups["all runs"] = rows
    return [{"run": run, "configs": len(g), "mean Δτ %": round(mean(r["Δτ %"] for r in g), 2),
             "min Δτ %": min(r["Δτ %"] for r in g), "mean wall gain %": round(mean(r["wall gain %"] for r in g), 2),
             "min wall gain %": min(r["wall gain %"] for r in g)} for run, g in groups.items() if g]


def shown(rows: list[dict]) -> list[dict]:
    """Numbers as printed in the notes: one decimal for percentages, two for the rest."""
    def fmt(k, v):
        if not isinstance(v, float):
            return v
        return f"{v:+.1f}" if "%" in k else f"{v:.2f}" if "ms" not in k else f"{v:.1f}"
    return [{k: fmt(k, v) for k, v in r.items()} for r in rows]


def pair_parser(doc: str) -> argparse.ArgumentParser:
    """Arguments of a script comparing one draft with its base over bench files (this one, seed_spread.py)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--draft", default="padrec-hass")
    ap.add_argument("--base", default="hass")
    ap.add_argument("--markdown", action="store_true")
    return ap


def main() -> None:
    a = pair_parser(__doc__).parse_args()
    rows = [g for f in a.files for g in gains(json.loads(Path(f).read_text()), a.draft, a.base)]
    if not rows:
        raise SystemExit(f"no configuration was timed with both {a.draft!r} and {a.base!r} in {a.files}")
    for title, body in ((f"{a.draft} vs {a.base}", rows), ("means", summary(rows))):
        if a.markdown:
            print(f"\n{title}\n\n{markdown(shown(body))}")
        else:
            console.print(table(shown(body), title=title))


if __name__ == "__main__":
    main()
