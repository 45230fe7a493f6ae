"""Write a dataset folder (meta.json, items.jsonl.gz, users.jsonl.gz, ...; see data/README.md) and install it
atomically.

Used by the importer and by scripts/convert_shared_datasets.py. The folder is written into a hidden temporary folder
under the data root and renamed into place only when complete, so a failed write leaves nothing behind.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from padrec import PadrecError
from padrec.data.dataset import Dataset, ItemInfo

MAX_HISTORY_DEFAULT = 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _write_gz(path: Path, text: str) -> None:
    """gzip with mtime=0, no embedded file name and level 9: identical input gives identical bytes."""
    with open(path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write(text.encode("utf-8"))


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def item_record(item: ItemInfo) -> dict:
    rec = {
        "id": item.id,
        "raw_id": item.raw_id,
        "title": item.title,
        "categories": list(item.categories),
        "brand": item.brand,
    }
    if item.description:
        rec["description"] = item.description
    return rec


def write_dataset_dir(
    path: Path,
    dataset: Dataset,
    meta: dict,
    provided_sids: dict[int, list[int]] | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict:
    """Write meta.json, items.jsonl.gz, users.jsonl.gz (and provided_sids.json.gz, and `extra_files`: name -> text)
    into the existing folder `path`.

    `meta` is completed with name, protocol, counts (Dataset.stats()) and max_history_default; the final meta is
    returned.
    """
    if [it.id for it in dataset.items] != list(range(dataset.num_items)):
        raise PadrecError(f"dataset {dataset.name!r}: item ids must be dense 0..n-1 in order")
    full = {"name": dataset.name, "protocol": dataset.protocol}
    full.update(meta)
    full["counts"] = dataset.stats()
    full.setdefault("max_history_default", MAX_HISTORY_DEFAULT)
    _write_gz(
        path / "items.jsonl.gz",
        "".join(_dumps(item_record(it)) + "\n" for it in dataset.items),
    )
    _write_gz(
        path / "users.jsonl.gz",
        "".join(
            _dumps({"user": u.user, "train": list(u.train), "valid": list(u.valid), "test": list(u.test)}) + "\n"
            for u in dataset.users
        ),
    )
    if provided_sids is not None:
        _write_gz(
            path / "provided_sids.json.gz", _dumps({str(i): list(provided_sids[i]) for i in range(dataset.num_items)})
        )
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text, encoding="utf-8")
    (path / "meta.json").write_text(json.dumps(full, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return full


def check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise PadrecError(
            f"invalid dataset name {name!r}: use letters, digits, '_', '-', '.' (not starting with '.' or '-')"
        )


def make_temp_dir(root: Path, name: str) -> Path:
    """An empty folder under `root` (hidden name) to write a dataset into before install_dir renames it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the dataset folder should be readable like any other
    return tmp


def install_dir(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished folder `tmp` to `target` (same file system), replacing an existing one if `overwrite`."""
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise PadrecError(f"dataset folder {target} already exists (pass overwrite=True to replace it)")
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rename(target, trash / target.name)
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(trash / target.name, target)  # put the old one back
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)
