"""The quality table: per dataset, MostPop, SASRec, the zoo's target and the earlier `small` target (beam 20, list 10)
on the test split, with TIGER's published Toys figures beside. Reads what `padrec baseline pop|sasrec --dataset D`
wrote under runs/baselines/ (else the committed benchmarks/results/baselines.json), the zoo manifests (zoo/<name>/)
and benchmarks/results/target_quality.json; writes benchmarks/results/baselines.json (the baseline rows with their
commands and machine) and prints a Markdown table.

    for d in beauty games toys yelp; do padrec baseline pop --dataset $d; \\
        padrec baseline sasrec --dataset $d --threads 2 --time-budget-min 20; done
    python benchmarks/quality_table.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from padrec.files import atomic_write_text
from padrec.provenance import machine_description

DATASETS = ("beauty", "games", "toys", "yelp")
COMMITTED = Path(__file__).parent / "results" / "baselines.json"
COLUMNS = [f"{m}@{k}" for k in (5, 10, 20) for m in ("recall", "ndcg")]
TIGER_TOYS = {"recall@5": 0.0521, "recall@10": 0.0712, "ndcg@5": 0.0371, "ndcg@10": 0.0432}  # Rajput et al. 2023


def _target_rows(path: Path) -> dict[str, list[dict]]:
    if not path.is_file():
        return {}
    out = {}
    for name, v in json.loads(path.read_text())["datasets"].items():
        rows = v["test"]["results"] if isinstance(v["test"], dict) else v["test"]
        out[name] = [{**r, "label": f"target {'beam20' if r['mode'] == 'beam' else 'list10'} "
                                    f"({r['users']} users)"} for r in rows]
    return out


def _zoo_rows(dataset: str) -> list[dict]:
    from padrec import zoo

    rows = []
    for name in zoo.list_models():
        m = zoo.read_manifest(zoo.model_dir(name))
        if m["dataset"] == dataset:
            shape = m["target"]["shape"]
            rows += [{**r, "label": f"zoo:{name} {r['label'].removeprefix('target ')} ({shape}, {r['users']} users)"}
                     for r in m["test"] if r["label"].startswith("target ")]
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baselines", default="runs/baselines")
    ap.add_argument("--targets", default="benchmarks/results/target_quality.json")
    ap.add_argument("--out", default="benchmarks/results/baselines.json")
    a = ap.parse_args(argv)
    targets = _target_rows(Path(a.targets))
    committed = json.loads(COMMITTED.read_text())["datasets"] if COMMITTED.is_file() else {}
    saved, lines = {}, ["| dataset | model | " + " | ".join(c.replace("recall", "R").replace("ndcg", "N")
                                                          for c in COLUMNS) + " |", "|---|---|" + "---:|" * 6]
    for d in DATASETS:
        evals = {b: json.loads(f.read_text()) for b in ("pop", "sasrec")
                 if (f := Path(a.baselines) / d / f"{b}_eval.json").is_file()} or committed.get(d, {})
        saved[d] = evals
        small = [{**r, "label": r["label"].replace("target", "small target (10 min)")} for r in targets.get(d, [])]
        rows = [r for e in evals.values() for r in e["test"]] + _zoo_rows(d) + small
        if d == "toys":
            rows.append({"label": "TIGER (published)", **TIGER_TOYS})
        for r in rows:
            cells = [f"{r[c]:.4f}" if c in r else "" for c in COLUMNS]
            lines.append(f"| {d} | {r['label']} | " + " | ".join(cells) + " |")
    atomic_write_text(Path(a.out), json.dumps({"command": " ".join(sys.argv), "machine": machine_description(),
                                               "datasets": saved}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
