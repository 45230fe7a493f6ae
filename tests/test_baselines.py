"""Baselines: MostPop's counts and windows, SASRec's causality and padding, its training through the shared loop, and
the CLI / `padrec evaluate` rows (same users and metrics as the target)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import FLOAT32_LOGITS_ATOL, pin_threads
from padrec import PadrecError
from padrec.baselines.evaluate import baseline_rows
from padrec.baselines.mostpop import popularity
from padrec.baselines.sasrec import SASRec, SASRecConfig, _left_pad, load_sasrec, train_sasrec
from padrec.cli import main
from padrec.data.dataset import Dataset, ItemInfo, UserSplit, load_dataset

pin_threads()


def _tiny(protocol: str) -> Dataset:
    items = [ItemInfo(i, str(i), f"item {i}") for i in range(5)]
    users = [UserSplit("a", (0, 1, 1), (2,), (3,)), UserSplit("b", (1, 4), (2, 2), (3,)), UserSplit("c", (4,), (), ())]
    return Dataset("tiny", protocol, items, users)


def test_most_popular_counts_what_precedes_the_split():
    ds = _tiny("time")
    assert popularity(ds, "valid") == [1, 4, 0, 2, 3]  # train: 1 x3, 4 x2, 0 x1; ties by id
    assert popularity(ds, "test") == [1, 2, 4, 0, 3]  # train + valid: 1 x3, 2 x3, 4 x2
    assert popularity(ds, "test", "previous")[:1] == [2]  # the validation period only
    with pytest.raises(PadrecError, match="time protocol and the test split"):
        popularity(_tiny("loo"), "test", "previous")
    rows = baseline_rows(ds, "test")
    assert [r["label"] for r in rows] == ["MostPop", "MostPop (valid period)"]
    assert rows[0]["users"] == 2 and rows[0]["recall@5"] == 1.0  # item 3 is ranked 5th of 5


def test_sasrec_is_causal_and_ignores_padding():
    torch.manual_seed(0)
    model = SASRec(12, SASRecConfig(layers=2, hidden=16, heads=2, dropout=0.0, max_len=8)).eval()
    seq = [3, 7, 1, 9, 4]
    with torch.no_grad():
        short = model(_left_pad([seq], 8))[0, -len(seq):]
        padded = model(_left_pad([seq, [1] * 8], 8))[0, -len(seq):]  # a longer row in the batch: 3 more pads
        other_end = model(_left_pad([seq[:3] + [11, 0]], 8))[0, -len(seq):]
    assert torch.allclose(short, padded, atol=FLOAT32_LOGITS_ATOL)  # padding changes nothing
    assert torch.allclose(short[:3], other_end[:3], atol=FLOAT32_LOGITS_ATOL)  # position t has not seen t+1..
    assert not torch.allclose(short[3:], other_end[3:], atol=1e-2)
    assert torch.isfinite(model(_left_pad([[2], [1, 2, 3, 4]], 8))).all()  # a padding row has no empty softmax


def test_sasrec_learns_the_synthetic_walks_and_resumes(synth_env, tmp_path, monkeypatch):
    import padrec.training.loop as loop

    ds = load_dataset(synth_env.name)
    cfg = SASRecConfig(epochs=3, batch_size=16, hidden=32, dropout=0.1, patience=5, threads=1)
    full = train_sasrec(ds, cfg, tmp_path / "full", progress=False)["history"]
    assert [h["epoch"] for h in full] == [1, 2, 3]
    model, meta = load_sasrec(tmp_path / "full", ds)
    assert meta["dataset"] == synth_env.name and meta["epoch"] == max(h["epoch"] for h in full if h["improved"])
    # interrupted at the start of epoch 2, then resumed: the same epochs as the uninterrupted run
    real, calls = loop.length_bucketed_batches, {"n": 0}

    def interrupt_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "length_bucketed_batches", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_sasrec(ds, cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(loop, "length_bucketed_batches", real)
    with pytest.raises(PadrecError, match="other settings"):
        train_sasrec(ds, SASRecConfig(**{**cfg.__dict__, "lr": 5e-3}), tmp_path / "cut", progress=False)
    resumed = train_sasrec(ds, cfg, tmp_path / "cut", progress=False)["history"]
    timing = ("seconds", "tokens_per_s")
    assert [{k: v for k, v in h.items() if k not in timing} for h in resumed] == \
        [{k: v for k, v in h.items() if k not in timing} for h in full]
    rows = {r["label"]: r for r in baseline_rows(ds, "valid", sasrec_dir=tmp_path / "full")}
    # each synthetic user walks one group of 10 items in order: SASRec learns it, popularity cannot
    assert rows["SASRec"]["recall@10"] > 2 * rows["MostPop"]["recall@10"]


def test_cli_baseline_and_evaluate_rows(synth_env, trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default_dir is runs/baselines/<dataset> under the working directory
    assert main(["baseline", "pop", "--dataset", synth_env.name]) == 0
    saved = json.loads((tmp_path / "runs" / "baselines" / synth_env.name / "pop_eval.json").read_text())
    assert saved["test"][0]["label"] == "MostPop" and saved["test"][0]["users"] == 80
    assert main(["evaluate", "--run", str(trained_run), "--limit", "30", "--mode", "beam"]) == 0
    res = json.loads((trained_run / "results" / "eval_test.json").read_text())
    assert [r["label"] for r in res["baselines"]] == ["MostPop"]  # no SASRec trained for this dataset here
    assert res["baselines"][0]["users"] == res["results"][0]["users"] == 30
