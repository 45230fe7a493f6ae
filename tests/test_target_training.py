"""Target training options: dropout (training only, weights and inference untouched), choosing the best epoch by
the validation queries' ranking, and resuming a run saved before a config field existed."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import pin_threads
from padrec import PadrecError
from padrec.models.checkpoint import read_meta
from padrec.models.target import build_target
from padrec.run import Run
from padrec.training.regularise import add_dropout
from padrec.training.target_trainer import TrainConfig, train_target

pin_threads()
IDS = torch.tensor([[1, 5, 9, 3, 12, 7, 2]])
CFG = TrainConfig(preset="tiny", epochs=3, batch_size=16, lr=3e-3, warmup_steps=3, patience=5, seed=7, threads=1)


def test_dropout_acts_in_training_only():
    plain, dropped = build_target(40, "tiny", seed=1), build_target(40, "tiny", seed=1)
    handles = add_dropout(dropped, 0.5)
    assert len(handles) == 1 + 2 * 2  # embeddings, and attention + MLP of each of the 2 layers
    dropped.train()
    with torch.no_grad():
        a, b = dropped(input_ids=IDS).logits, dropped(input_ids=IDS).logits
        assert not torch.equal(a, b)  # a different mask on each forward
        plain.eval(), dropped.eval()
        assert torch.equal(plain(input_ids=IDS).logits, dropped(input_ids=IDS).logits)
    assert add_dropout(plain, 0.0) == []
    with pytest.raises(PadrecError, match="dropout must be in"):
        TrainConfig(dropout=1.0)
    with pytest.raises(PadrecError, match="select_by must be one of"):
        TrainConfig(select_by="hit@10")


def test_best_epoch_by_validation_ranking(synth_env, fresh_run):
    cfg = TrainConfig(**{**CFG.__dict__, "select_by": "recall@10", "dropout": 0.1})
    hist = train_target(Run(fresh_run), cfg, progress=False)["history"]
    assert all(0.0 <= h["valid_recall@10"] <= 1.0 and "valid_ndcg@10" in h for h in hist)
    best = max(hist, key=lambda h: (h["valid_recall@10"], -h["epoch"]))  # the first epoch of the highest recall
    meta = read_meta(fresh_run / "target")
    assert meta["epoch"] == best["epoch"] and meta["valid_recall@10"] == best["valid_recall@10"]
    assert [h["improved"] for h in hist][0] is True


def test_resume_of_a_run_saved_before_a_config_field_existed(synth_env, fresh_run):
    run = Run(fresh_run)
    short = TrainConfig(**{**CFG.__dict__, "epochs": 2})
    train_target(run, short, progress=False)
    meta_file = fresh_run / "target_last" / "padrec.json"
    meta = json.loads(meta_file.read_text())
    del meta["train_config"]["dropout"], meta["train_config"]["select_by"]  # as written before they existed
    meta_file.write_text(json.dumps(meta))
    hist = train_target(run, short, progress=False)["history"]  # resumes: nothing left to do
    assert [h["epoch"] for h in hist] == [1, 2]
    with pytest.raises(PadrecError, match="different settings"):
        train_target(run, TrainConfig(**{**short.__dict__, "dropout": 0.2}), progress=False)
