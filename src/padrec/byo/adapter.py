"""An imported checkpoint inside a run: what `padrec import-model` checks and records, and what a run with an
imported target loads (the renamed model, the prompt renderer).

    runs/<name>/
      run.json, sids.json   as for any run; run.json's extra.imported holds the manifest and what was checked
      imported/vocab_map.json    dense id -> checkpoint token id (a permutation of the model's rows)
      imported/item_strings.json each dense item's SID token strings (how prompts write it)
      target/config.json, target/padrec.json   the checkpoint's config and the sha256 of its weight files, so
                                  drafts are tied to its weights like to a trained target's; the weights stay where
                                  they are
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from padrec import PadrecError
from padrec.byo.checkpoint import inspect_model_dir, load_renamed, verify_weights
from padrec.byo.manifest import ModelManifest
from padrec.byo.prompt import PromptRenderer
from padrec.byo.vocab_map import build_vocab_map, invert, match_items
from padrec.data.dataset import Dataset
from padrec.files import atomic_write_text, sha256_file
from padrec.tokenizer.semantic_ids import SemanticIDs

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
BOUNDARY_USERS = 3  # prompts whose boundary with items is checked (the first with every item, the rest with 20)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PadrecError(f"cannot load a tokenizer from {path}: {e}") from e


def tokenizer_hashes(path: str) -> dict[str, str]:
    return {n: sha256_file(Path(path) / n) for n in TOKENIZER_FILES if (Path(path) / n).is_file()}


@dataclass
class PreparedImport:
    """Everything an import writes, checked; `write(run_path)` puts it into a run made from `sids`."""

    manifest: ModelManifest
    sids: SemanticIDs
    hf_of_dense: list[int]
    item_strings: list[list[str]]
    model_info: dict
    report: dict

    @property
    def extra(self) -> dict:
        return {"imported": {"manifest": self.manifest.to_dict(), "vocab_rows": len(self.hf_of_dense),
                             "tokenizer_files": tokenizer_hashes(self.manifest.tokenizer_path),
                             "report": self.report}}

    def write(self, run_path: Path) -> None:
        d = Path(run_path) / "imported"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "vocab_map.json", json.dumps(self.hf_of_dense))
        atomic_write_text(d / "item_strings.json", json.dumps(self.item_strings))
        target = Path(run_path) / "target"
        target.mkdir(exist_ok=True)
        shutil.copyfile(Path(self.manifest.model_dir) / "config.json", target / "config.json")
        meta = {"imported_from": self.manifest.model_dir, "files": self.model_info["files"],
                "sid_fingerprint": self.sids.fingerprint(), "vocab_size": len(self.hf_of_dense)}
        atomic_write_text(target / "padrec.json", json.dumps(meta, indent=2))


def prepare_import(manifest: ModelManifest, dataset: Dataset) -> PreparedImport:
    info = inspect_model_dir(manifest.model_dir)
    tokenizer = load_tokenizer(manifest.tokenizer_path)
    try:
        index = json.loads(Path(manifest.item_index).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PadrecError(f"cannot read the item index {manifest.item_index}: {e}") from e
    item_strings, match = match_items(index, [str(it.raw_id) for it in dataset.items])
    vmap = build_vocab_map(tokenizer, info["vocab_size"], item_strings, manifest.item_end)
    sids = SemanticIDs(vmap.codes, vmap.vocab, info={"method": "imported", "item_index": manifest.item_index})
    hf_ids = {i: [vmap.hf_of_dense[t] for t in sids.item_tokens(i)] for i in range(sids.num_items)}
    renderer = PromptRenderer(manifest, tokenizer, item_strings, [it.title or "" for it in dataset.items],
                              vmap.dense_of_hf())
    cases = dataset.eval_cases("test", max_history=manifest.max_history)[:BOUNDARY_USERS]
    for n, case in enumerate(cases):
        renderer.check_boundary(case.history, range(sids.num_items) if n == 0 else range(min(20, sids.num_items)),
                                hf_ids.__getitem__)
    report = {**vmap.report, **match, "boundary_checked_prompts": len(cases)}
    return PreparedImport(manifest, sids, vmap.hf_of_dense, item_strings, info, report)


class ImportedModel:
    """The imported side of a run: its renamed target and its prompts."""

    def __init__(self, run_path: Path, extra: dict, dataset_items):
        self.path = Path(run_path)
        self.extra = extra
        self.manifest = ModelManifest.from_dict(extra["manifest"])
        self._items = dataset_items

    @cached_property
    def hf_of_dense(self) -> list[int]:
        return json.loads((self.path / "imported" / "vocab_map.json").read_text())

    @property
    def vocab_size(self) -> int:
        return int(self.extra["vocab_rows"])

    @cached_property
    def tokenizer(self):
        path = self.manifest.tokenizer_path
        if tokenizer_hashes(path) != self.extra["tokenizer_files"]:
            raise PadrecError(f"the tokenizer in {path} changed since `padrec import-model`: token ids may have "
                              "moved; import the model again into a new run")
        return load_tokenizer(path)

    @cached_property
    def renderer(self) -> PromptRenderer:
        strings = json.loads((self.path / "imported" / "item_strings.json").read_text())
        return PromptRenderer(self.manifest, self.tokenizer, strings, [it.title or "" for it in self._items()],
                              invert(self.hf_of_dense))

    def load_target(self):
        meta = json.loads((self.path / "target" / "padrec.json").read_text())
        verify_weights(Path(self.manifest.model_dir), meta["files"])
        return load_renamed(Path(self.manifest.model_dir), self.manifest.dtype, self.hf_of_dense)
