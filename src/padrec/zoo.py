"""The model zoo: trained recommenders shipped inside the repository, ready to use without training.

    zoo/<name>/
      manifest.json        what the model is and how it was made (commands, commit, machine, training minutes),
                           its test metrics beside the baselines', its speed, and the sha256 of every file below
      run.json, sids.json  the run directory's files ...
      target/, drafts/     ... with the weights stored in 16 bits where that changes no decoded list

Any command that takes a run directory takes `zoo:<name>` instead (`padrec evaluate --run zoo:beauty`,
`Recommender("zoo:beauty")`): it works on a verified copy under `runs/zoo/<name>` ($PADREC_ZOO_COPIES), so what
commands write there (results, benchmarks, calibrations) never touches the shipped files. The copy is made, and
every file checked against the manifest, the first time and whenever the shipped model changed.

This module stays free of torch: the command line lists and copies models without loading a framework.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from padrec import PadrecError
from padrec.files import atomic_write_text, sha256_file

PREFIX = "zoo:"
MANIFEST = "manifest.json"


def zoo_root() -> Path:
    """Where shipped models live: $PADREC_ZOO_DIR, else the repository's zoo/ folder."""
    env = os.environ.get("PADREC_ZOO_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "zoo"


def copies_root() -> Path:
    """Where `zoo:<name>` is copied to be used: $PADREC_ZOO_COPIES, else runs/zoo under the current folder."""
    return Path(os.environ.get("PADREC_ZOO_COPIES", Path("runs") / "zoo"))


def list_models(root: Path | None = None) -> list[str]:
    root = root or zoo_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def model_dir(name: str, root: Path | None = None) -> Path:
    root = root or zoo_root()
    path = root / name
    if not (path / MANIFEST).is_file():
        known = ", ".join(list_models(root)) or "none"
        raise PadrecError(f"the model zoo ({root}) has no model {name!r} (known: {known}); see `padrec zoo list`")
    return path


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PadrecError(f"zoo manifest {Path(path) / MANIFEST} is unreadable: {e}") from e
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        raise PadrecError(f"zoo manifest {Path(path) / MANIFEST} lists no files")
    return manifest


def verify(path: Path, manifest: dict | None = None) -> dict:
    """Every file the manifest lists is there with its recorded sha256; returns the manifest."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    for rel, digest in manifest["files"].items():
        f = path / rel
        if not f.is_file():
            raise PadrecError(f"zoo model {path} is incomplete: {rel} is missing (a sparse or partial checkout? "
                              "`git lfs`-style pointers are not used here; re-clone or `git checkout -- zoo`)")
        if sha256_file(f) != digest:
            raise PadrecError(f"zoo model {path} is corrupt: {rel} does not match its sha256 in {MANIFEST} "
                              "(edited or truncated; `git checkout -- zoo` restores it)")
    return manifest


def copy_model(name: str, dest: Path, root: Path | None = None) -> Path:
    """A verified copy of shipped model `name` in `dest` (its files replaced where the shipped model changed;
    other files there, such as results, are kept). A folder holding another model or run is refused."""
    src = model_dir(name, root)
    manifest = verify(src)
    dest = Path(dest)
    if (dest / MANIFEST).is_file():
        other = read_manifest(dest).get("name")
        if other != manifest["name"]:
            raise PadrecError(f"{dest} already holds zoo model {other!r}; choose an empty or new folder")
    elif dest.exists():
        # an interrupted copy holds some of the model's files and nothing else: finish it
        foreign = [p for p in dest.rglob("*") if p.is_file() and p.relative_to(dest).as_posix() not in manifest["files"]]
        if foreign:
            raise PadrecError(f"{dest} already holds other files ({foreign[0].relative_to(dest)}, ...); "
                              "choose an empty or new folder")
    for rel in manifest["files"]:
        _copy_atomically(src / rel, dest / rel)
    verify(dest, manifest)
    atomic_write_text(dest / MANIFEST, (src / MANIFEST).read_text())  # last: a copy without it is redone
    return dest


def _copy_atomically(src: Path, dest: Path) -> None:
    """Copy beside and rename, so another process using the copy (a torchrun rank) never sees half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def resolve_run(spec: str | Path) -> Path:
    """A run directory for `spec`: a path as given, or for `zoo:<name>` the up-to-date verified working copy."""
    text = str(spec)
    if not text.startswith(PREFIX):
        return Path(spec)
    name = text[len(PREFIX):]
    src = model_dir(name)
    dest = copies_root() / name
    if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_bytes() == (src / MANIFEST).read_bytes():
        return dest  # the checkpoints verify their own weights' sha256 when loaded
    return copy_model(name, dest)


def size_bytes(path: Path, manifest: dict) -> int:
    return sum((Path(path) / rel).stat().st_size for rel in manifest["files"]) + (Path(path) / MANIFEST).stat().st_size
