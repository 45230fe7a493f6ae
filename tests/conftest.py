"""Shared fixtures: a small synthetic dataset imported under a temporary data root, and a tiny trained run.

Nothing here writes into the repository's data/ or the user's home: PADREC_DATA_DIR and PADREC_CACHE_DIR point
at temporary folders, and only while a fixture that needs them is active (`synth_env` per test; the session
fixtures set them only while they build).
"""

from __future__ import annotations

import csv
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from helpers import pin_threads

pin_threads()
# Property tests draw the same examples on every run and machine (a CI failure reproduces anywhere, and a green run
# means the same thing on the next clone); HYPOTHESIS_PROFILE=explore draws new ones, to look for failures.
settings.register_profile("ci", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

SYNTH = "synth"
KINDS = ["shirt", "mug", "lamp", "book", "sock", "chair"]  # one group (category) of 10 items each
COLORS = ["red", "blue", "green", "black", "white", "yellow", "brown", "grey", "pink", "navy"]
MATERIALS = ["cotton", "ceramic", "metal", "paper", "wool", "oak"]
N_USERS = 80


@dataclass(frozen=True)
class SynthData:
    name: str
    root: Path  # PADREC_DATA_DIR
    cache: Path  # PADREC_CACHE_DIR
    raw_ids: tuple[str, ...]  # raw item ids in dense order
    interactions_csv: Path  # the files it was imported from
    items_csv: Path

    def env(self) -> dict[str, str]:
        return {"PADREC_DATA_DIR": str(self.root), "PADREC_CACHE_DIR": str(self.cache)}


def _write_synth_files(folder: Path) -> tuple[Path, Path, list[str]]:
    """60 items in 6 groups; each user walks through one group in order (item k -> k+1 mod 10), so the next
    item is predictable from the last one."""
    rng = random.Random(1234)
    items, raw_ids = [], []
    for g, kind in enumerate(KINDS):
        for j in range(10):
            i = g * 10 + j
            raw = f"I{i:03d}"
            raw_ids.append(raw)
            items.append({"id": raw, "title": f"{COLORS[j]} {MATERIALS[g]} {kind} {i}",
                          "categories": f"Home|{kind.title()}s", "brand": f"brand{g}"})
    rows = []
    for u in range(N_USERS):
        g, start, n = u % len(KINDS), rng.randrange(10), rng.randint(5, 9)
        for k in range(n):
            rows.append({"user": f"u{u:02d}", "item": raw_ids[g * 10 + (start + k) % 10], "order": k})
    rng.shuffle(rows)  # the importer must sort by `order`
    items_csv, inter_csv = folder / "items.csv", folder / "interactions.csv"
    with open(items_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "title", "categories", "brand"])
        w.writeheader()
        w.writerows(items)
    with open(inter_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["user", "item", "order"])
        w.writeheader()
        w.writerows(rows)
    return inter_csv, items_csv, raw_ids


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> SynthData:
    from padrec.data.importer import import_dataset

    base = tmp_path_factory.mktemp("synth")
    root, cache, src = base / "data", base / "cache", base / "src"
    src.mkdir()
    inter, items, raw_ids = _write_synth_files(src)
    import_dataset(SYNTH, inter, items, split="loo", root=root)
    return SynthData(SYNTH, root, cache, tuple(raw_ids), inter, items)


@pytest.fixture
def synth_env(synth_data, monkeypatch) -> SynthData:
    """Point padrec at the synthetic data root and a temporary cache for one test."""
    for k, v in synth_data.env().items():
        monkeypatch.setenv(k, v)
    pin_threads()
    return synth_data


@contextmanager
def _synth_env(synth_data: SynthData):
    """The synthetic data root and cache while a session fixture builds, and the suite's thread count after."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in synth_data.env().items():
            mp.setenv(k, v)
        yield
    pin_threads()


def _copy_run(src: Path, tmp_path_factory, name: str) -> Path:
    run = tmp_path_factory.mktemp("runs") / name
    shutil.copytree(src, run)
    return run


@pytest.fixture(scope="session")
def tokenized_run(synth_data, tmp_path_factory) -> Path:
    """A run directory with semantic IDs (levels 2 x codebook 8) but no target, made through the CLI.
    Tests must not write into it: copy it with `fresh_run`."""
    from padrec.cli import main

    run = tmp_path_factory.mktemp("runs") / "tokenized"
    with _synth_env(synth_data):
        rc = main(["tokenize", "--dataset", SYNTH, "--run", str(run), "--levels", "2", "--codebook-size", "8"])
    assert rc == 0
    return run


@pytest.fixture(scope="session")
def trained_run(synth_data, tokenized_run, tmp_path_factory) -> Path:
    """The tokenized run plus a tiny target trained for 2 epochs through the CLI (read-only for tests)."""
    from padrec.cli import main

    run = _copy_run(tokenized_run, tmp_path_factory, "trained")
    with _synth_env(synth_data):
        rc = main(["train-target", "--run", str(run), "--preset", "tiny", "--epochs", "2", "--threads", "1"])
    assert rc == 0
    return run


@pytest.fixture(scope="session")
def eagle_run(synth_data, trained_run, tmp_path_factory) -> Path:
    """The tiny trained run plus an EAGLE draft trained for one short epoch (read-only for tests)."""
    from padrec.drafts.train import DraftTrainConfig, train_draft
    from padrec.run import Run

    run = _copy_run(trained_run, tmp_path_factory, "eagle")
    with _synth_env(synth_data):
        train_draft(Run(run), DraftTrainConfig(kind="eagle", epochs=1, batch_size=32, warmup_steps=2,
                                               max_valid_cases=20, threads=1), progress=False)
    return run


@pytest.fixture
def fresh_run(tokenized_run, tmp_path) -> Path:
    """A private copy of the tokenized run (run.json + sids.json, no target)."""
    run = tmp_path / "run"
    shutil.copytree(tokenized_run, run)
    return run
