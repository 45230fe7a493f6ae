"""Fault tolerance: a training process SIGKILLed mid-run resumes from its last finished epoch, and folders a
killed writer leaves behind are repaired or removed, never taken for checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from padrec.models.checkpoint import load_checkpoint, read_meta, recover_dir, replace_dir_atomically, save_checkpoint
from padrec.models.target import build_target

VOCAB = 40
IDS = torch.tensor([[1, 5, 9, 3, 12, 7, 2]])
EPOCHS = 3


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _hidden(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _two_versions(tmp_path):
    v1, v2 = build_target(VOCAB, "tiny", seed=1), build_target(VOCAB, "tiny", seed=2)
    path = tmp_path / "ckpt"
    save_checkpoint(v1, path, {"version": 1})
    return path, v1, v2


def test_killed_between_the_two_renames_finishes_the_swap(tmp_path):
    path, _, v2 = _two_versions(tmp_path)
    # the state a SIGKILL between `final -> old` and `tmp -> final` leaves: a complete new folder under its
    # temp name, the previous version renamed aside, nothing under the checkpoint's own name
    new = tmp_path / ".ckpt.tmp-abc123"
    save_checkpoint(v2, new, {"version": 2})
    path.rename(tmp_path / ".ckpt.old-.ckpt.tmp-abc123")
    recover_dir(path)
    loaded, meta = load_checkpoint(path)
    assert meta["version"] == 2 and torch.equal(_logits(loaded), _logits(v2))
    assert _hidden(tmp_path) == []


def test_killed_while_renaming_aside_keeps_the_old_version(tmp_path):
    path, v1, _ = _two_versions(tmp_path)
    path.rename(tmp_path / ".ckpt.old-.ckpt.tmp-gone")  # its new version never made it (or was removed)
    (tmp_path / ".ckpt.tmp-half").mkdir()  # a write killed halfway through
    (tmp_path / ".ckpt.tmp-half" / "model.safetensors").write_bytes(b"partial")
    recover_dir(path)
    loaded, meta = load_checkpoint(path)
    assert meta["version"] == 1 and torch.equal(_logits(loaded), _logits(v1))
    assert _hidden(tmp_path) == []


def test_next_write_clears_leftovers_of_a_killed_write(tmp_path):
    path, _, v2 = _two_versions(tmp_path)
    (tmp_path / ".ckpt.tmp-half").mkdir()
    (tmp_path / ".ckpt.tmp-half" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / ".other.tmp-keep").mkdir()  # another checkpoint's temp folder is not this write's business
    save_checkpoint(v2, path, {"version": 2})
    assert read_meta(path)["version"] == 2
    assert _hidden(tmp_path) == [".other.tmp-keep"]


def test_failed_second_rename_puts_the_old_version_back(tmp_path, monkeypatch):
    path, v1, _ = _two_versions(tmp_path)
    tmp = tmp_path / ".ckpt.tmp-x"
    save_checkpoint(build_target(VOCAB, "tiny", seed=3), tmp, {"version": 2})
    real = type(path).rename

    def rename(self, target):
        if self == tmp:
            raise OSError("rename failed")
        return real(self, target)

    monkeypatch.setattr(type(path), "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        replace_dir_atomically(tmp, path)
    monkeypatch.undo()
    loaded, meta = load_checkpoint(path)
    assert meta["version"] == 1 and torch.equal(_logits(loaded), _logits(v1))


def _epochs_done(run) -> int:
    try:
        return int(read_meta(run / "target_last").get("epoch", 0))
    except Exception:  # not there yet, or caught mid-swap
        return 0


def test_sigkill_mid_training_resumes_from_the_last_finished_epoch(synth_env, fresh_run, tmp_path):
    # batch size 1 makes an epoch ~80 optimizer steps, so the process is still training when it is killed
    cmd = [sys.executable, "-m", "padrec", "train-target", "--run", str(fresh_run), "--preset", "tiny",
           "--epochs", str(EPOCHS), "--batch-size", "1", "--patience", "99", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while _epochs_done(fresh_run) < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]

    done = _epochs_done(fresh_run)
    assert 1 <= done < EPOCHS
    for sub in ("target", "target_last"):  # what sits under a checkpoint's name is complete
        load_checkpoint(fresh_run / sub)
    state = torch.load(fresh_run / "target_last" / "train_state.pt", weights_only=True)
    before = json.loads(state["history_json"])
    assert [h["epoch"] for h in before] == list(range(1, done + 1))

    # make the worst case certain, whatever the kill hit: a half-written temp folder, a half-written history
    # temp file and a swap caught between its two renames (target_last renamed aside, the new version lost)
    (fresh_run / ".target_last.tmp-killed").mkdir()
    (fresh_run / ".target_last.tmp-killed" / "model.safetensors").write_bytes(b"partial")
    (fresh_run / ".train_history.json.killed.tmp").write_text("[{")
    (fresh_run / "target_last").rename(fresh_run / ".target_last.old-.target_last.tmp-lost")

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert f"{done} epoch(s) done" in out, "the restart did not resume"

    after = json.loads((fresh_run / "train_history.json").read_text())
    assert [h["epoch"] for h in after] == list(range(1, EPOCHS + 1))
    assert after[:done] == before, "finished epochs were retrained or lost"
    assert _hidden(fresh_run) == [], "temp folders were left behind"
    _, meta = load_checkpoint(fresh_run / "target_last")
    assert meta["epoch"] == EPOCHS
    load_checkpoint(fresh_run / "target")
