"""Bring your own model: fine-tune a local HF causal LM (a tiny Qwen2 here) as the run's target."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import pin_threads
from padrec.cli import main
from padrec.run import Run


@pytest.fixture
def tiny_qwen2(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path / "qwen2-tiny"
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def test_train_and_evaluate_with_base_model(synth_env, tiny_qwen2, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["tokenize", "--dataset", synth_env.name, "--run", str(run_dir), "--levels", "2",
                 "--codebook-size", "8"]) == 0
    assert main(["train-target", "--run", str(run_dir), "--base-model", str(tiny_qwen2), "--epochs", "1",
                 "--threads", "1"]) == 0
    pin_threads()

    run = Run(run_dir)
    vocab = run.sids.vocab.size
    cfg = json.loads((run.target_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2"
    assert cfg["vocab_size"] == vocab
    meta = json.loads((run.target_dir / "padrec.json").read_text())
    assert meta["train_config"]["base_model"] == str(tiny_qwen2)
    assert meta["sid_fingerprint"] == run.info.sid_fingerprint

    model = run.load_target()
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.get_input_embeddings().weight.shape[0] == vocab
    assert model.get_output_embeddings().weight.shape[0] == vocab
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2

    assert main(["evaluate", "--run", str(run_dir), "--limit", "8"]) == 0
    res = json.loads((run.results_dir / "eval_test.json").read_text())
    for r in res["results"]:
        assert r["users"] == 8
        assert 0.0 <= r["recall@10"] <= 1.0

    out = tmp_path / "recs.jsonl"
    assert main(["recommend", "--run", str(run_dir), "--out", str(out), "--limit", "4", "--mode", "list"]) == 0
    for line in out.read_text().splitlines():
        items = json.loads(line)["items"]
        assert len(items) == len(set(items)) == 10 and set(items) <= set(synth_env.raw_ids)

    # the rest of docs/BRING_YOUR_OWN_MODEL.md: a feature-level draft for the fine-tuned Qwen2, then speculative
    # decoding, which must give the autoregressive lists token for token, and the benchmark
    assert main(["train-draft", "--run", str(run_dir), "--kind", "eagle", "--epochs", "1", "--threads", "1"]) == 0
    pin_threads()
    draft_meta = json.loads((run_dir / "drafts" / "eagle" / "draft.json").read_text())
    assert draft_meta["identity"]["target_hidden_size"] == 32 and draft_meta["identity"]["vocab_size"] == vocab
    sd = tmp_path / "sd.jsonl"
    assert main(["recommend", "--run", str(run_dir), "--out", str(sd), "--limit", "4", "--mode", "list",
                 "--decoder", "sd", "--draft", "eagle", "--tree", "3,2,6"]) == 0
    ar_rows = [json.loads(line) for line in out.read_text().splitlines()]
    sd_rows = [json.loads(line) for line in sd.read_text().splitlines()]
    assert [r["user"] for r in sd_rows] == [r["user"] for r in ar_rows]
    assert [r["items"] for r in sd_rows] == [r["items"] for r in ar_rows]
    assert all(r["tau"] >= 1.0 for r in sd_rows)

    bench = tmp_path / "bench.json"
    assert main(["bench", "--run", str(run_dir), "--drafts", "eagle", "--users", "3", "--warmup", "1", "--chain", "2",
                 "--tree", "3,2,6", "--no-naive", "--no-hf", "--out", str(bench)]) == 0
    res = json.loads(bench.read_text())
    spec = [r for r in res["rows"] if r["decoder"].startswith("sd ")]
    assert res["users"] == 3 and len(spec) == 2
    assert all(r["identical_to_ar"] == "3/3" for r in spec), res["rows"]


def test_bad_base_model_path(synth_env, fresh_run, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["train-target", "--run", str(fresh_run), "--base-model", str(tmp_path / "nothing"), "--epochs", "1"])
    assert rc == 2
    assert "cannot load a causal LM" in capsys.readouterr().err
