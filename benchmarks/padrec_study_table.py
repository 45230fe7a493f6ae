"""The PAD-Rec study's tables, from the JSON files `benchmarks/padrec_study.py` wrote (one per process):

    .venv/bin/python benchmarks/padrec_study_table.py [benchmarks/results/padrec_study*.json] [--markdown]

Prints (1) every draft and configuration on every run, (2) each PAD-Rec draft against its own base (Δτ and
the wall-clock gain, per configuration), (3) the ablations, and writes `padrec_study_summary.json` plus a bar plot
`padrec_study_gain.png` of Δτ per run next to the inputs.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from padrec.evaluation.bench_rows import speculative_rows
from padrec.files import atomic_write_text
from padrec.ui import console, markdown, pyplot, save_figure, table

RESULTS = Path(__file__).parent / "results"
MAIN = ("st-lm", "st-eagle", "st-hass", "st-padrec-eagle", "st-padrec-hass")


def load(paths: list[str]) -> dict:
    runs, meta = {}, {}
    for p in paths:
        d = json.loads(Path(p).read_text())
        for key, res in d["runs"].items():
            runs[key] = res
            meta[key] = {"command": d["command"], "machine": d["machine"], "file": str(p)}
    return {"runs": runs, "meta": meta}


def run_label(res: dict) -> str:
    label = f"{res['dataset']} ({'shared' if res['layout'] == 'shared' else 'per-level'}"
    target = res.get("target")
    if isinstance(target, dict) and target.get("layers") != 4:  # the study's default is the small preset
        label += f", {target['layers']}x{target['hidden']} target"
    return label + ")"


def main_rows(runs: dict) -> list[dict]:
    out = []
    for res in runs.values():
        ar = next(r for r in res["rows"] if r["decoder"] == "ar")
        for r in res["rows"]:
            if r["decoder"] not in ("ar", "ar-hf") and r["draft"] not in MAIN:
                continue
            agree = res["training"].get(r["draft"].removeprefix("st-"), {}).get("valid_agreement_by_step")
            out.append({
                "run": run_label(res), "draft": r["draft"].removeprefix("st-") if r["draft"] != "-" else "-",
                "decoder": r["decoder"], "τ": round(r["tau"], 2), "speedup": round(r["speedup"], 2),
                "AR ms": round(ar["median_ms"], 1), "ms": round(r["median_ms"], 1), "same": r["identical_to_ar"],
                "R@10": round(r["recall@10"], 4), "N@10": round(r["ndcg@10"], 4),
                "draft ms/rnd": None if r.get("draft_ms_per_round") is None else round(r["draft_ms_per_round"], 2),
                "valid agree (steps)": "/".join(f"{a:.2f}" for a in agree) if agree else "-",
            })
    return out


def compact_rows(runs: dict) -> list[dict]:
    """One row per run and configuration: τ (speedup) of every draft family, Recall/NDCG@10 (equal for all)."""
    out = []
    for res in runs.values():
        ar = next(r for r in res["rows"] if r["decoder"] == "ar")
        for decoder in dict.fromkeys(r["decoder"] for r in speculative_rows(res["rows"])):
            rows = {r["draft"]: r for r in res["rows"] if r["decoder"] == decoder}
            same = all(r["identical_to_ar"] == f"{res['users']}/{res['users']}" for r in rows.values())
            out.append({"run": run_label(res), "decoder": decoder, "AR ms": round(ar["median_ms"], 1),
                        **{d.removeprefix("st-"): f"{rows[d]['tau']:.2f} ({rows[d]['speedup']:.2f}×)" if d in rows
                           else "-" for d in MAIN},
                        "R@10": round(ar["recall@10"], 4), "N@10": round(ar["ndcg@10"], 4),
                        "all = AR": "yes" if same else "NO"})
    return out


def gain_rows(runs: dict, ablations: bool) -> list[dict]:
    out = []
    for res in runs.values():
        for g in res["gains"]:
            is_ablation = g["vs"] == "st-padrec-hass"
            if is_ablation != ablations:
                continue
            out.append({"run": run_label(res), "draft": g["draft"].removeprefix("st-"),
                        "vs": g["vs"].removeprefix("st-"), "decoder": g["decoder"], "τ": g["τ"],
                        "τ base": g["τ base"], "Δτ %": g["Δτ %"], "speedup": g["speedup"],
                        "base speedup": g["base speedup"], "wall gain %": g["wall gain %"]})
    return out


def plot(gains: list[dict], out: Path) -> None:
    plt = pyplot()
    labels = [f"{g['run']}\n{g['draft']} {g['decoder'].removeprefix('sd ')}" for g in gains]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(gains)), 4))
    ax.bar(range(len(gains)), [g["Δτ %"] for g in gains], color=["C0" if g["Δτ %"] >= 0 else "C3" for g in gains])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(gains)), labels, rotation=75, fontsize=6)
    ax.set(ylabel="Δτ vs base draft (%)", title="PAD-Rec: acceptance length against its own base draft")
    save_figure(fig, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (for the README / notes)")
    a = ap.parse_args()
    files = a.files or sorted(p for p in glob.glob(str(RESULTS / "padrec_study*.json")) if "summary" not in p)
    data = load(files)
    tables = {"τ (speedup vs AR) by draft": compact_rows(data["runs"]), "all drafts": main_rows(data["runs"]), "PAD-Rec vs its base": gain_rows(data["runs"], False),
              "ablations (vs full padrec-hass)": gain_rows(data["runs"], True)}
    for title, rows in tables.items():
        if a.markdown:
            console.print(f"\n### {title}\n\n{markdown(rows)}\n", markup=False, soft_wrap=True)
        else:
            console.print(table(rows, title=title))
    summary = {"tables": tables, "sources": data["meta"]}
    atomic_write_text(RESULTS / "padrec_study_summary.json", json.dumps(summary, indent=2))
    if tables["PAD-Rec vs its base"]:
        plot(tables["PAD-Rec vs its base"], RESULTS / "padrec_study_gain.png")


if __name__ == "__main__":
    main()
