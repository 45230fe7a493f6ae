"""Atomic, verified checkpoints: HF `save_pretrained` (safetensors + config.json) plus padrec.json.

A checkpoint folder is written into a hidden temp folder next to its final place and renamed into it, so a
crash never leaves a half-written folder under the checkpoint's name. A process killed mid-write (SIGKILL, power
loss: no cleanup runs) leaves hidden `.<name>.tmp-*` / `.<name>.old-*` folders; the next write of that
checkpoint (and a resumed training, before it looks for its state) repairs or removes them with `recover_dir`.
padrec.json records the sha256 of every weight file and the fingerprint of the semantic-ID table the model was
trained for; loading checks both.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from padrec import PadrecError
from padrec.files import sha256_file

META = "padrec.json"


_OLD = ".old-"


def replace_dir_atomically(tmp: Path, final: Path) -> None:
    """Swap a fully written temp folder into place. The old folder is removed only after the rename.

    POSIX cannot swap two folders in one step, so for a moment between the two renames `final` does not exist;
    the old folder's name records the temp folder's, so `recover_dir` can finish the swap after a crash there.
    """
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}{_OLD}{tmp.name}")
        final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        if old is not None and not final.exists():
            old.rename(final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def recover_dir(path: Path) -> None:
    """Repair what a killed writer of folder `path` left behind; call it only where no other process may be
    writing `path` at the same time (it deletes temp folders).

    Killed between the two renames of `replace_dir_atomically`: `path` is missing, its previous version sits in
    `.<name>.old-<temp>` and the complete new one in `<temp>`; the swap is finished (or, without the new one,
    undone). Killed while writing: an incomplete `.<name>.tmp-*` folder, which is deleted, as are old versions
    whose swap had finished.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return
    prefix = f".{path.name}"
    stale = sorted(p for p in path.parent.iterdir()
                   if p.is_dir() and (p.name.startswith(prefix + ".tmp-") or p.name.startswith(prefix + _OLD)))
    if not path.exists():
        for old in (p for p in stale if p.name.startswith(prefix + _OLD)):
            new = path.parent / old.name[len(prefix + _OLD):]
            # the old version is only renamed aside once the new one is complete
            (new if new.is_dir() else old).rename(path)
            break
    for p in stale:
        if p.exists():
            shutil.rmtree(p, ignore_errors=True)


def write_dir_atomically(path: Path, write_files, meta: dict, meta_name: str = META,
                         train_state: dict | None = None) -> None:
    """Create folder `path` atomically: `write_files(tmp)` writes the payload into a temp folder next to it,
    then an optional torch-saved training state and the metadata file (with the sha256 of every file) are
    added, and the temp folder is swapped into place. On any failure the temp folder is removed and an
    existing `path` is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        write_files(tmp)
        if train_state is not None:
            torch.save(train_state, tmp / "train_state.pt")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / meta_name).write_text(json.dumps({**meta, "files": files}, indent=2))
        replace_dir_atomically(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(model, path: Path, meta: dict, extra_tensors: dict[str, object] | None = None) -> None:
    """Write `model` (and optionally a torch-saved training state) to `path` atomically."""
    write_dir_atomically(path, lambda tmp: model.save_pretrained(tmp, safe_serialization=True), meta,
                         train_state=extra_tensors)


def read_meta(path: Path) -> dict:
    path = Path(path)
    if not (path / META).is_file():
        raise PadrecError(f"no checkpoint at {path} (missing {META})")
    try:
        return json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise PadrecError(f"checkpoint metadata {path / META} is corrupt: {e}") from e


def verify_files(path: Path, meta: dict) -> None:
    for name, digest in meta.get("files", {}).items():
        f = Path(path) / name
        if not f.is_file():
            raise PadrecError(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256_file(f) != digest:
            raise PadrecError(f"checkpoint {path} is corrupt: {name} does not match its recorded sha256 (truncated?)")


def load_checkpoint(path: Path, expect: dict | None = None):
    """Load a verified model; `expect` maps metadata keys (e.g. sid_fingerprint) to required values."""
    path = Path(path)
    meta = read_meta(path)
    for key, value in (expect or {}).items():
        if meta.get(key) != value:
            raise PadrecError(
                f"checkpoint {path} was made for {key}={meta.get(key)!r}, but this run has {value!r} "
                "(a checkpoint from another tokenizer or vocabulary?)"
            )
    verify_files(path, meta)
    try:
        # computed in float32 whatever the stored width (the zoo stores 16-bit weights)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as e:  # HF raises many types for a broken folder
        raise PadrecError(f"cannot load checkpoint {path}: {e}") from e
    model.eval()
    return model, meta


def load_train_state(path: Path) -> dict | None:
    f = Path(path) / "train_state.pt"
    if not f.is_file():
        return None
    # on the CPU whatever device saved it: the optimizer moves its state to the parameters' device when loaded
    return torch.load(f, weights_only=True, map_location="cpu")
