"""Packing a trained run into the model zoo (zoo.py): 16-bit weights where that changes no decoded list, drafts
re-tied to the stored target, their acceptance tables refitted, the test evaluation of what is shipped, and a
manifest that says how it was made and hashes every file.

Weights are stored in 16 bits and computed in float32 (checkpoints load as float32). Rounding the target moves
its logits by ~1e-3, which could reorder two near-tied items: the 16-bit target is kept only if its beam-20 and
list-10 lists equal the float32 original's on every checked test user; otherwise the target ships in float32. A
draft never changes what is decoded (speculative decoding is lossless), so drafts are always stored in 16 bits.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from padrec import PadrecError
from padrec.decoding.trie import ItemTrie
from padrec.drafts.acceptance import ACCEPTANCE_FILE
from padrec.drafts.registry import (
    draft_dir,
    list_drafts,
    load_draft,
    load_draft_model,
    save_draft_dir,
    target_identity,
)
from padrec.evaluation.evaluate import RankConfig, rank_histories
from padrec.files import atomic_write_text, sha256_file
from padrec.models.checkpoint import read_meta, replace_dir_atomically, save_checkpoint
from padrec.pipeline import evaluate
from padrec.provenance import machine_description
from padrec.run import Run
from padrec.speculative.calibration import calibrate_draft
from padrec.ui import console
from padrec.zoo import MANIFEST, model_dir, read_manifest, verify, zoo_root

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
CHECK_CONFIGS = (RankConfig(mode="beam", beam_size=20), RankConfig(mode="list", n_items=10))


@dataclass
class PackConfig:
    name: str
    drafts: tuple[str, ...] | None = None  # default: every draft of the run
    dtype: str = "float16"
    check_users: int | None = 1000  # test users whose lists must not change in 16 bits (None: all)
    description: str = ""
    commands: tuple[str, ...] = ()  # how the run was made, for the manifest
    baselines_file: str | None = None  # committed baseline results, used where none are trained locally

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise PadrecError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


def rounded(model, dtype: torch.dtype):
    """A float32 copy of `model` whose weights are what `dtype` storage keeps."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).float())
    return out


def lists_unchanged(run: Run, original, candidate, users: int | None) -> dict:
    """Beam-20 and list-10 lists of both models on the first `users` test users: how many are identical."""
    cases = run.dataset.eval_cases("test", max_history=run.info.max_history)[:users]
    trie = ItemTrie(run.sids.all_item_tokens())
    histories = [c.history for c in cases]
    out = {}
    with torch.inference_mode():
        for cfg in CHECK_CONFIGS:
            a = rank_histories(original, run, trie, histories, cfg, desc=f"{cfg.mode} float32")
            b = rank_histories(candidate, run, trie, histories, cfg, desc=f"{cfg.mode} 16-bit")
            out[f"{cfg.mode}{cfg.list_length}"] = {"users": len(cases), "identical": sum(x == y for x, y in zip(a, b))}
    return out


def _store_target(run: Run, stage: Path, cfg: PackConfig) -> dict:
    model = run.load_target()
    dtype = DTYPES[cfg.dtype]
    check = lists_unchanged(run, model, rounded(model, dtype), cfg.check_users)
    same = all(c["identical"] == c["users"] for c in check.values())
    stored = cfg.dtype if same else "float32"
    meta = {k: v for k, v in read_meta(run.target_dir).items() if k != "files"}
    save_checkpoint(model.to(dtype) if same else model, stage / "target", meta)
    console.print(f"target stored in {stored}: lists identical to float32 on "
                  + ", ".join(f"{k} {c['identical']}/{c['users']}" for k, c in check.items()))
    return {"stored": stored, "check": check}


def _store_draft(run: Run, staged: Run, name: str, dtype: torch.dtype) -> dict:
    """The draft in 16 bits, tied to the staged target; its acceptance table refitted if it had one."""
    src = draft_dir(run, name)
    model, meta = load_draft_model(run, name)  # verified, and checked against this run's target
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta = {k: v for k, v in meta.items() if k != "files"}
    meta["identity"] = {**meta.get("identity", {}), **target_identity(staged)}
    save_draft_dir(draft_dir(staged, name), state, meta)
    calibrated = (src / ACCEPTANCE_FILE).is_file()
    if calibrated:
        calibrate_draft(staged, name, load_draft(staged, name, acceptance=False), staged.load_target())
    return {"kind": meta["kind"], "stored": str(dtype).removeprefix("torch."), "calibrated": calibrated,
            "training": {k: meta[k] for k in ("train_config", "history") if k in meta}}


def _committed_baselines(dataset: str, path: str | None, have: set[str]) -> list[dict]:
    if not path or not Path(path).is_file():
        return []
    entry = json.loads(Path(path).read_text()).get("datasets", {}).get(dataset, {})
    rows = [r for b in entry.values() for r in b.get("test", []) if r["label"] not in have]
    return [{**r, "source": path} for r in rows]


def _training_minutes(run: Run) -> float | None:
    f = run.path / "train_history.json"
    if not f.is_file():
        return None
    secs = sum(e.get("seconds", 0) for e in json.loads(f.read_text()))
    return round(secs / 60, 1) if secs else None


def pack(run_dir: str | Path, cfg: PackConfig, zoo: Path | None = None) -> Path:
    """Write zoo/<name>/ from run `run_dir` (replacing an existing model of that name atomically)."""
    run = Run(run_dir)
    out = Path(zoo or zoo_root()) / cfg.name
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{cfg.name}.tmp-"))
    try:
        for f in ("run.json", "sids.json", "train_history.json"):
            if (run.path / f).is_file():
                shutil.copyfile(run.path / f, stage / f)
        target = _store_target(run, stage, cfg)
        staged = Run(stage)
        names = list(cfg.drafts) if cfg.drafts is not None else list_drafts(run)
        drafts = {n: _store_draft(run, staged, n, DTYPES[cfg.dtype]) for n in names}
        result = evaluate(staged, "test", list(CHECK_CONFIGS))
        have = {r["label"] for r in result["baselines"]}
        result["baselines"] += _committed_baselines(run.info.dataset, cfg.baselines_file, have)
        atomic_write_text(staged.results_dir / "eval_test.json", json.dumps(result, indent=2))
        manifest = _manifest(run, staged, cfg, target, drafts, result["results"] + result["baselines"])
        manifest["files"] = {p.relative_to(stage).as_posix(): sha256_file(p)
                             for p in sorted(stage.rglob("*")) if p.is_file()}
        atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2))
        replace_dir_atomically(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _manifest(run: Run, staged: Run, cfg: PackConfig, target: dict, drafts: dict, rows: list[dict]) -> dict:
    tmeta = read_meta(staged.target_dir)
    model = staged.load_target()
    params = sum(p.numel() for p in model.parameters())
    shape = f"{model.config.num_hidden_layers}x{model.config.hidden_size}"
    return {
        "name": cfg.name,
        "description": cfg.description,
        "dataset": run.info.dataset,
        "target": {"shape": shape, "preset": tmeta.get("preset"), "parameters": params, "training_minutes": _training_minutes(run),
                   "epoch": tmeta.get("epoch"), **target},
        "drafts": drafts,
        "test": [{k: v for k, v in r.items() if k not in ("config",)} | {"label": _label(r)} for r in rows],
        "commands": list(cfg.commands),
        "packed_from": str(run.path),
        "packed": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_description(),
        "pack_config": {k: v for k, v in asdict(cfg).items() if k not in ("commands", "description")},
    }


def _label(row: dict) -> str:
    if row["mode"] == "baseline":
        return row["label"]
    return f"target beam{row['config']['beam_size']}" if row["mode"] == "beam" else f"target list{row['config']['n_items']}"


def add_bench(name: str, bench_file: Path, zoo: Path | None = None) -> Path:
    """Record a `padrec bench` result, measured on a copy of zoo model `name`, in its manifest (`speed`: the
    fastest speculative configuration whose every list equalled AR's) and ship the JSON as results/bench.json."""
    path = model_dir(name, zoo)
    manifest = verify(path)
    bench = json.loads(Path(bench_file).read_text())
    benched = Path(bench.get("run", ""))
    if not (benched / MANIFEST).is_file() or read_manifest(benched)["files"] != manifest["files"]:
        raise PadrecError(f"{bench_file} was not measured on a copy of zoo model {name!r} as shipped; "
                          f"run `padrec bench --run zoo:{name} ...`")
    rows = bench["rows"]
    ar = next(r for r in rows if r["decoder"] == "ar")
    lossless = [r for r in rows if r["decoder"].startswith("sd") and r["identical_to_ar"] == f"{bench['users']}/{bench['users']}"]
    if not lossless:
        raise PadrecError(f"{bench_file} has no speculative row whose lists all equal AR's")
    best = max(lossless, key=lambda r: r["speedup"])
    manifest["speed"] = {"decoder": best["decoder"], "draft": best["draft"], "speedup": best["speedup"],
                         "tau": best["tau"], "ar_ms": ar["median_ms"], "sd_ms": best["median_ms"],
                         "identical_to_ar": best["identical_to_ar"], "users": bench["users"],
                         "threads": bench.get("threads"), "command": bench.get("command"),
                         "machine": bench.get("machine")}
    (path / "results").mkdir(exist_ok=True)
    shutil.copyfile(bench_file, path / "results" / "bench.json")
    manifest["files"]["results/bench.json"] = sha256_file(path / "results" / "bench.json")
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2))
    return path
