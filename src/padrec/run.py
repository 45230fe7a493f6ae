"""A run directory: everything one trained recommender needs, in one folder.

    runs/<name>/
      run.json          dataset, tokenizer settings, SID fingerprint, max history
      sids.json         item -> semantic ID table (with its own fingerprint)
      target/           best target checkpoint (safetensors + config.json + padrec.json)
      target_last/      latest epoch's checkpoint + train_state.pt, for resuming
      train_history.json, results/ ...
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from padrec import PadrecError
from padrec.data.dataset import Dataset, load_dataset
from padrec.files import atomic_write_text
from padrec.tokenizer.semantic_ids import SemanticIDs, items_to_tokens
from padrec.zoo import resolve_run


@dataclass
class RunInfo:
    dataset: str
    tokenizer: dict
    sid_fingerprint: str
    max_history: int = 20
    extra: dict = field(default_factory=dict)


class Run:
    def __init__(self, path: Path | str):
        self.path = resolve_run(path)  # a path, or zoo:<name> (a verified copy of a shipped model)
        if not (self.path / "run.json").is_file():
            raise PadrecError(f"{self.path} is not a padrec run directory (no run.json); create one with `padrec tokenize`")
        try:
            self.info = RunInfo(**json.loads((self.path / "run.json").read_text()))
        except (json.JSONDecodeError, TypeError) as e:
            raise PadrecError(f"{self.path / 'run.json'} is corrupt: {e}") from e

    @classmethod
    def create(cls, path: Path | str, dataset: str, tokenizer: dict, sids: SemanticIDs, max_history: int = 20) -> "Run":
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sids.save(path / "sids.json")
        info = RunInfo(dataset=dataset, tokenizer=tokenizer, sid_fingerprint=sids.fingerprint(), max_history=max_history)
        atomic_write_text(path / "run.json", json.dumps(info.__dict__, indent=2))
        return cls(path)

    @cached_property
    def sids(self) -> SemanticIDs:
        sids = SemanticIDs.load(self.path / "sids.json")
        if sids.fingerprint() != self.info.sid_fingerprint:
            raise PadrecError(f"{self.path / 'sids.json'} does not belong to this run (fingerprint mismatch)")
        return sids

    @classmethod
    def create_imported(cls, path: Path | str, manifest_path: Path | str, dataset: str) -> "Run":
        """A run around a user's trained checkpoint as it is (`padrec import-model`, padrec/byo)."""
        from padrec.byo.adapter import prepare_import
        from padrec.byo.manifest import ModelManifest

        path = Path(path)
        if (path / "run.json").exists():
            raise PadrecError(f"{path} is already a run; import into a new folder")
        prep = prepare_import(ModelManifest.load(manifest_path), load_dataset(dataset))
        path.mkdir(parents=True, exist_ok=True)
        prep.write(path)
        prep.sids.save(path / "sids.json")
        info = RunInfo(dataset=dataset, tokenizer={"method": "imported"}, sid_fingerprint=prep.sids.fingerprint(),
                       max_history=prep.manifest.max_history, extra=prep.extra)
        atomic_write_text(path / "run.json", json.dumps(info.__dict__, indent=2))
        return cls(path)

    @cached_property
    def imported(self):
        """The imported checkpoint behind this run (padrec.byo.adapter.ImportedModel), or None for a padrec-trained
        target."""
        if "imported" not in self.info.extra:
            return None
        from padrec.byo.adapter import ImportedModel

        return ImportedModel(self.path, self.info.extra["imported"], lambda: self.dataset.items)

    @property
    def vocab_size(self) -> int:
        """Rows of the target's embedding: the SID vocabulary, or an imported model's whole vocabulary (renamed)."""
        return self.imported.vocab_size if self.imported is not None else self.sids.vocab.size

    @cached_property
    def dataset(self) -> Dataset:
        ds = load_dataset(self.info.dataset)
        if ds.num_items != self.sids.num_items:
            raise PadrecError(
                f"dataset {ds.name!r} has {ds.num_items} items but the run's tokenizer covers {self.sids.num_items}"
            )
        return ds

    def prompt(self, history) -> list[int]:
        """The prompt of a history (dense item ids, oldest first): its last `max_history` items as tokens (for an
        imported model, its own template around them)."""
        if self.imported is not None:
            return self.imported.renderer.dense_ids(history)
        return items_to_tokens(list(history)[-self.info.max_history:], self.sids)

    @property
    def target_dir(self) -> Path:
        return self.path / "target"

    @property
    def target_last_dir(self) -> Path:
        return self.path / "target_last"

    def checkpoint_identity(self) -> dict:
        """Metadata a target checkpoint must carry to be used with this run."""
        return {"sid_fingerprint": self.info.sid_fingerprint, "vocab_size": self.vocab_size}

    def load_target(self, device: str | None = None):
        from padrec.models.checkpoint import load_checkpoint

        if self.imported is not None:
            model = self.imported.load_target()
            return model if device is None else model.to(device)
        if not self.target_dir.exists():
            raise PadrecError(f"run {self.path} has no trained target yet; run `padrec train-target --run {self.path}`")
        model, _ = load_checkpoint(self.target_dir, expect=self.checkpoint_identity())
        return model if device is None else model.to(device)

    @property
    def results_dir(self) -> Path:
        d = self.path / "results"
        d.mkdir(exist_ok=True)
        return d
