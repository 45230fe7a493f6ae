"""Saved drafts of a run: `runs/<run>/drafts/<name>/` = draft.json + model.safetensors.

draft.json records the draft's kind, its architecture (`model_config`), the training config and history,
the sha256 of every file, and the identity of the target it was trained for:

    sid_fingerprint      the run's semantic-ID table
    vocab_size           the SID vocabulary size
    target_hidden_size   the target's hidden size (features of an EAGLE draft must match it)
    target_hash          hash of the target checkpoint's weight files (target/padrec.json "files")

`load_draft` refuses a draft whose identity differs from the run's current target, or whose files fail their
sha256 check. A resumable last-epoch state lives next to it in `drafts/.<name>.last/` (with train_state.pt).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from padrec import PadrecError
from padrec.drafts.acceptance import ACCEPTANCE_FILE, AcceptanceModel
from padrec.drafts.kinds import DRAFT_KINDS, KINDS
from padrec.files import sha256_file
from padrec.models.checkpoint import read_meta, write_dir_atomically

META = "draft.json"
WEIGHTS = "model.safetensors"


def drafts_dir(run) -> Path:
    return Path(run.path) / "drafts"


def draft_dir(run, name: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise PadrecError(f"invalid draft name {name!r}")
    return drafts_dir(run) / name


def last_dir(run, name: str) -> Path:
    return drafts_dir(run) / f".{name}.last"


def list_drafts(run) -> list[str]:
    d = drafts_dir(run)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".") and (p / META).is_file())


def default_draft(run) -> str | None:
    """The draft used when none is named: `eagle` if the run has it, else its first, else None."""
    drafts = list_drafts(run)
    return "eagle" if "eagle" in drafts else (drafts[0] if drafts else None)


def target_identity(run) -> dict:
    """What a draft must have been trained for to be used with this run's current target."""
    if not run.target_dir.exists():
        raise PadrecError(f"run {run.path} has no trained target yet; run `padrec train-target --run {run.path}`")
    meta = read_meta(run.target_dir)
    weights = {k: v for k, v in sorted(meta.get("files", {}).items()) if k.endswith((".safetensors", ".bin"))}
    if not weights:
        raise PadrecError(f"target checkpoint {run.target_dir} records no weight files in padrec.json")
    try:
        config = json.loads((run.target_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PadrecError(f"target checkpoint {run.target_dir} has no readable config.json: {e}") from e
    text_cfg = config.get("text_config", config)
    return {
        "sid_fingerprint": run.info.sid_fingerprint,
        "vocab_size": run.vocab_size,
        "target_hidden_size": text_cfg.get("hidden_size"),
        "target_hash": hashlib.sha256(json.dumps(weights, sort_keys=True).encode()).hexdigest()[:16],
    }


def save_draft_dir(path: Path, state_dict: dict[str, torch.Tensor], meta: dict,
                   train_state: dict | None = None) -> None:
    """Write weights (+ optional training state) and draft.json into `path` atomically."""
    from safetensors.torch import save_file

    weights = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    write_dir_atomically(path, lambda tmp: save_file(weights, str(tmp / WEIGHTS)), meta, meta_name=META,
                         train_state=train_state)


def read_draft_meta(path: Path) -> dict:
    path = Path(path)
    if not (path / META).is_file():
        raise PadrecError(f"no draft at {path} (missing {META})")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise PadrecError(f"draft metadata {path / META} is corrupt: {e}") from e
    if meta.get("kind") not in KINDS:
        raise PadrecError(f"draft {path} has unknown kind {meta.get('kind')!r} (expected one of {KINDS})")
    return meta


def check_identity(path: Path, meta: dict, expect: dict) -> None:
    have = meta.get("identity", {})
    bad = [key for key, value in expect.items() if have.get(key) != value]
    if bad:
        trained = ", ".join(f"{k}={have.get(k)!r}" for k in bad)
        current = ", ".join(f"{k}={expect[k]!r}" for k in bad)
        raise PadrecError(
            f"draft {path} was trained for {trained}, but this run's target has {current} "
            "(a draft for another target, tokenizer or vocabulary? retrain it with `train_draft`)"
        )


def verify_draft_files(path: Path, meta: dict) -> None:
    files = meta.get("files", {})
    if WEIGHTS not in files:
        raise PadrecError(f"draft {path} is corrupt: {META} records no {WEIGHTS}")
    for name, digest in files.items():
        f = Path(path) / name
        if not f.is_file():
            raise PadrecError(f"draft {path} is incomplete: {name} is missing")
        if sha256_file(f) != digest:
            raise PadrecError(f"draft {path} is corrupt: {name} does not match its recorded sha256 (truncated?)")


def build_draft_model(meta: dict):
    """An untrained module with the architecture recorded in draft.json."""
    kind, mc = meta["kind"], meta.get("model_config")
    if not isinstance(mc, dict):
        raise PadrecError("draft metadata has no model_config")
    try:
        return DRAFT_KINDS[kind].rebuild(mc)
    except (TypeError, KeyError) as e:
        raise PadrecError(f"draft metadata has an invalid model_config: {e}") from e


def load_draft_weights(path: Path, meta: dict):
    """Verified files -> module with the saved weights (eval mode)."""
    from safetensors.torch import load_file

    verify_draft_files(path, meta)
    model = build_draft_model(meta)
    try:
        state = load_file(str(Path(path) / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except Exception as e:  # safetensors / shape errors
        raise PadrecError(f"cannot load draft weights from {path}: {e}") from e
    return model.eval()


def load_draft_model(run, name: str):
    """The verified module of a saved draft, checked against the run's current target. Returns (model, meta)."""
    path = draft_dir(run, name)
    if not path.exists():
        known = ", ".join(list_drafts(run)) or "none"
        raise PadrecError(f"run {run.path} has no draft {name!r} (known: {known}); train one with `train_draft`")
    meta = read_draft_meta(path)
    check_identity(path, meta, target_identity(run))
    return load_draft_weights(path, meta), meta


def load_draft(run, name: str, device: str | None = None, acceptance: bool = True):
    """A ready-to-use `Draft` for the run's target (on `device`, default where it was loaded: the CPU), with its
    acceptance table when it has one (`acceptance=False`: without, e.g. to refit a stale one)."""
    model, meta = load_draft_model(run, name)
    if device is not None:
        model = model.to(device)
    draft = DRAFT_KINDS[meta["kind"]].wrap(model, name)
    if acceptance:
        draft.acceptance = load_acceptance(draft_dir(run, name), meta)
    return draft


def load_acceptance(draft_path: Path, meta: dict) -> AcceptanceModel | None:
    """The acceptance table saved next to a draft, or None when it has none. A table fitted for other weights
    (the draft was retrained since) is an error, not silently used."""
    f = Path(draft_path) / ACCEPTANCE_FILE
    if not f.exists():
        return None
    return AcceptanceModel.load(f, weights_sha256=meta.get("files", {}).get(WEIGHTS, ""))
