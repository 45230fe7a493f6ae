"""A tiny end-to-end run through the CLI: import -> tokenize -> train -> recommend -> evaluate."""

from __future__ import annotations

import json

import pytest

from padrec.cli import main


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_data_import_and_stats_cli(synth_env, tmp_path, capsys):
    rc = main(["data", "import", "--name", "synth_cli", "--interactions", str(synth_env.interactions_csv),
               "--items", str(synth_env.items_csv), "--split", "loo"])
    assert rc == 0
    assert (synth_env.root / "synth_cli" / "meta.json").is_file()
    capsys.readouterr()
    assert main(["data", "stats", synth_env.name]) == 0
    out = capsys.readouterr().out
    assert "60" in out and "80" in out  # items, users


def test_run_directory_after_training(trained_run):
    assert (trained_run / "run.json").is_file()
    assert (trained_run / "sids.json").is_file()
    assert (trained_run / "target" / "model.safetensors").is_file()
    assert (trained_run / "target" / "padrec.json").is_file()
    assert (trained_run / "target_last" / "train_state.pt").is_file()
    hist = json.loads((trained_run / "train_history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    png = trained_run / "results" / "training_curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode,length", [("beam", 20), ("list", 10)])
def test_recommend_jsonl(synth_env, trained_run, tmp_path, mode, length):
    out = tmp_path / f"recs_{mode}.jsonl"
    rc = main(["recommend", "--run", str(trained_run), "--out", str(out), "--limit", "20", "--mode", mode])
    assert rc == 0
    rows = _read_jsonl(out)
    assert len(rows) == 20
    known = set(synth_env.raw_ids)
    for row in rows:
        assert set(row) == {"user", "items"}
        assert isinstance(row["user"], str) and row["user"].startswith("u")
        items = row["items"]
        assert len(items) == length
        assert len(set(items)) == len(items), f"duplicate items in {mode} list: {items}"
        assert set(items) <= known
    assert len({r["user"] for r in rows}) == 20


def test_evaluate_writes_metrics(synth_env, trained_run):
    rc = main(["evaluate", "--run", str(trained_run), "--limit", "30"])
    assert rc == 0
    res = json.loads((trained_run / "results" / "eval_test.json").read_text())
    assert res["split"] == "test" and res["dataset"] == synth_env.name
    assert {r["mode"] for r in res["results"]} == {"beam", "list"}
    for r in res["results"]:
        assert r["users"] == 30
        for key in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
            assert isinstance(r[key], float)
            assert 0.0 <= r[key] <= 1.0
        assert r["ndcg@10"] <= r["recall@10"] + 1e-9  # single target: NDCG <= Recall


def test_recommend_history_prints(synth_env, trained_run, capsys):
    capsys.readouterr()
    rc = main(["recommend", "--run", str(trained_run), "--history", "I000,I001,I002", "--beam-size", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "recommendations" in out
    assert any(f"I{i:03d}" in out for i in range(60))


@pytest.mark.parametrize("method", ["rq-vae", "rq-kmeans-shared"])
def test_other_tokenizers_run_end_to_end(synth_env, tmp_path, method):
    """RQ-VAE IDs, and the shared code vocabulary (a token does not reveal its level), through the whole pipeline."""
    run = tmp_path / method
    extra = ["--sids", "rq-vae"] if method == "rq-vae" else ["--vocab", "shared"]
    assert main(["tokenize", "--dataset", "synth", "--run", str(run), "--levels", "2", "--codebook-size", "8",
                 *extra]) == 0
    sids = json.loads((run / "sids.json").read_text())
    assert sids["vocab"]["layout"] == ("shared" if method.endswith("shared") else "per_level")
    assert main(["train-target", "--run", str(run), "--preset", "tiny", "--epochs", "1", "--threads", "1"]) == 0
    out = tmp_path / "recs.jsonl"
    assert main(["recommend", "--run", str(run), "--out", str(out), "--limit", "10", "--mode", "list"]) == 0
    for row in _read_jsonl(out):
        assert len(row["items"]) == 10 and len(set(row["items"])) == 10
        assert set(row["items"]) <= set(synth_env.raw_ids)
