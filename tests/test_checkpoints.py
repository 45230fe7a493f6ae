"""Checkpoints: round trip, corruption and identity checks, atomic replacement, and resuming training."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import padrec.training.loop as loop
from padrec import PadrecError
from padrec.models.checkpoint import load_checkpoint, read_meta, save_checkpoint
from padrec.models.target import build_target
from padrec.run import Run
from padrec.training.target_trainer import TrainConfig, train_target

VOCAB = 40
IDS = torch.tensor([[1, 5, 9, 3, 12, 7, 2]])


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip_identical_logits(tmp_path):
    model = build_target(VOCAB, "tiny", seed=3)
    save_checkpoint(model, tmp_path / "ckpt", {"sid_fingerprint": "abc", "vocab_size": VOCAB})
    loaded, meta = load_checkpoint(tmp_path / "ckpt", expect={"sid_fingerprint": "abc", "vocab_size": VOCAB})
    assert meta["sid_fingerprint"] == "abc" and "model.safetensors" in meta["files"]
    assert torch.equal(_logits(model), _logits(loaded))
    assert _leftovers(tmp_path) == []


def test_truncated_weights_are_rejected(tmp_path):
    save_checkpoint(build_target(VOCAB, "tiny"), tmp_path / "ckpt", {})
    f = tmp_path / "ckpt" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(PadrecError, match="corrupt|truncated"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_files_are_rejected(tmp_path):
    save_checkpoint(build_target(VOCAB, "tiny"), tmp_path / "ckpt", {})
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(PadrecError, match="missing"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(PadrecError, match="no checkpoint"):
        load_checkpoint(tmp_path / "does-not-exist")
    (tmp_path / "ckpt" / "padrec.json").write_text("{not json")
    with pytest.raises(PadrecError, match="corrupt"):
        load_checkpoint(tmp_path / "ckpt")


def test_sid_fingerprint_mismatch(synth_env, trained_run):
    target = trained_run / "target"
    good = Run(trained_run).checkpoint_identity()
    load_checkpoint(target, expect=good)  # sanity
    with pytest.raises(PadrecError, match="sid_fingerprint") as e:
        load_checkpoint(target, expect={"sid_fingerprint": "other"})
    assert "'other'" in str(e.value)
    with pytest.raises(PadrecError, match="vocab_size"):
        load_checkpoint(target, expect={"vocab_size": good["vocab_size"] + 1})


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    old = build_target(VOCAB, "tiny", seed=1)
    path = tmp_path / "ckpt"
    save_checkpoint(old, path, {"version": 1})
    before = _logits(old)

    new = build_target(VOCAB, "tiny", seed=2)

    def broken_save(save_dir, **kw):
        (save_dir / "model.safetensors").write_bytes(b"partial")  # half-written weights, then a crash
        raise OSError("disk full")

    new.save_pretrained = broken_save
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(new, path, {"version": 2})
    assert _leftovers(tmp_path) == [], "temporary folders were left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded, meta = load_checkpoint(path)
    assert meta["version"] == 1
    assert torch.equal(_logits(loaded), before)

    # an interrupt (BaseException) is cleaned up the same way
    def interrupted(save_dir, **kw):
        (save_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    new.save_pretrained = interrupted
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(new, path, {"version": 2})
    assert _leftovers(tmp_path) == []
    assert read_meta(path)["version"] == 1


# ------------------------------------------------------------------------------------------------- resuming

CFG = TrainConfig(preset="tiny", epochs=2, batch_size=16, lr=3e-3, warmup_steps=3, patience=5, seed=7, threads=1)


def _history_without_timings(hist):
    return [{k: v for k, v in h.items() if k not in ("seconds", "tokens_per_s")} for h in hist]


def test_resume_matches_uninterrupted_run(synth_env, tokenized_run, tmp_path, monkeypatch):
    import shutil

    run_a, run_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tokenized_run, run_a)
    shutil.copytree(tokenized_run, run_b)

    full = train_target(Run(run_a), CFG, progress=False)
    assert [h["epoch"] for h in full["history"]] == [1, 2]

    # interrupt run b at the start of epoch 2
    calls = {"n": 0}
    real = loop.length_bucketed_batches  # the shared training loop draws each epoch's batches

    def interrupt_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "length_bucketed_batches", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        train_target(Run(run_b), CFG, progress=False)
    monkeypatch.setattr(loop, "length_bucketed_batches", real)
    after_one = json.loads((run_b / "train_history.json").read_text())
    assert [h["epoch"] for h in after_one] == [1]

    # resuming with other settings is refused, and changes nothing
    with pytest.raises(PadrecError, match="different settings"):
        train_target(Run(run_b), replace(CFG, lr=1e-3), progress=False)
    assert json.loads((run_b / "train_history.json").read_text()) == after_one

    resumed = train_target(Run(run_b), CFG, resume=True, progress=False)
    hist = resumed["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[0] == after_one[0], "the first epoch's entry changed on resume"
    for got, want in zip(_history_without_timings(hist), _history_without_timings(full["history"])):
        assert got.keys() == want.keys()
        for k in got:
            assert got[k] == (pytest.approx(want[k], rel=1e-5) if isinstance(want[k], float) else want[k]), k

    for sub in ("target_last", "target"):
        ma, _ = load_checkpoint(run_a / sub)
        mb, _ = load_checkpoint(run_b / sub)
        pa, pb = _params(ma), _params(mb)
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.allclose(pa[k], pb[k], atol=1e-6), f"{sub}: parameter {k} differs after resume"

    # the optimizer state was restored too: both runs' saved states agree
    sa = torch.load(run_a / "target_last" / "train_state.pt", weights_only=True)
    sb = torch.load(run_b / "target_last" / "train_state.pt", weights_only=True)
    assert sa["epoch"] == sb["epoch"] == 1
    for pid, st in sa["optimizer"]["state"].items():
        assert torch.allclose(st["exp_avg"], sb["optimizer"]["state"][pid]["exp_avg"], atol=1e-6)

    # a finished run resumed with the same settings does nothing more
    again = train_target(Run(run_b), CFG, resume=True, progress=False)
    assert _history_without_timings(again["history"]) == _history_without_timings(hist)
