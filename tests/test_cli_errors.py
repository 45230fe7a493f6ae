"""Bad input gives exit code 2 and a one-line message on stderr (CLI), or PadrecError (API)."""

from __future__ import annotations

import pytest

from padrec import PadrecError
from padrec.cli import main


def _fails(argv, capsys, *fragments):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit code {rc} for {argv}; stderr: {err}"
    errors = [line for line in err.splitlines() if line.startswith("padrec: error: ")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for frag in fragments:
        assert frag.lower() in err.lower(), f"{frag!r} not in {err!r}"
    return err


def test_unknown_dataset(synth_env, capsys):
    _fails(["data", "stats", "no_such_dataset"], capsys, "unknown dataset", "no_such_dataset", "synth")


def test_tokenize_unknown_dataset(synth_env, tmp_path, capsys):
    _fails(["tokenize", "--dataset", "nope", "--run", str(tmp_path / "r")], capsys, "unknown dataset")
    assert not (tmp_path / "r").exists()


def test_recommend_unknown_item(synth_env, trained_run, capsys):
    _fails(["recommend", "--run", str(trained_run), "--history", "I001,NOPE42"], capsys, "unknown item", "NOPE42")


def test_recommend_empty_history(synth_env, trained_run, capsys):
    _fails(["recommend", "--run", str(trained_run), "--history", ""], capsys, "empty history")
    _fails(["recommend", "--run", str(trained_run), "--history", " , "], capsys, "empty history")


def test_recommend_history_ids_may_have_spaces(synth_env, trained_run, capsys):
    capsys.readouterr()
    assert main(["recommend", "--run", str(trained_run), "--history", "I001, I002", "--beam-size", "3"]) == 0


def test_recommend_without_out_or_history(synth_env, trained_run, capsys):
    _fails(["recommend", "--run", str(trained_run)], capsys, "--out")


def test_beam_size_larger_than_catalogue(synth_env, trained_run, tmp_path, capsys):
    _fails(["recommend", "--run", str(trained_run), "--history", "I001", "--beam-size", "500"], capsys, "catalogue")
    out = tmp_path / "r.jsonl"
    _fails(["recommend", "--run", str(trained_run), "--out", str(out), "--limit", "3", "--beam-size", "500"],
           capsys, "catalogue")
    assert not out.exists()
    _fails(["evaluate", "--run", str(trained_run), "--limit", "3", "--mode", "beam", "--beam-size", "500"],
           capsys, "catalogue")


def test_evaluate_not_a_run(synth_env, tmp_path, capsys):
    _fails(["evaluate", "--run", str(tmp_path)], capsys, "not a padrec run", str(tmp_path))
    _fails(["evaluate", "--run", str(tmp_path / "missing")], capsys, "not a padrec run")


def test_evaluate_untrained_run(synth_env, fresh_run, capsys):
    _fails(["evaluate", "--run", str(fresh_run), "--limit", "3"], capsys, "no trained target", "train-target")


def test_train_unknown_preset(synth_env, fresh_run, trained_run, capsys):
    _fails(["train-target", "--run", str(fresh_run), "--preset", "gigantic", "--epochs", "1"], capsys,
           "unknown target preset", "gigantic")
    assert not (fresh_run / "target").exists()
    # also on a run that already holds a checkpoint to resume from: the preset is what is wrong
    _fails(["train-target", "--run", str(trained_run), "--preset", "gigantic", "--epochs", "1"], capsys,
           "unknown target preset")


def test_unknown_mode(synth_env, trained_run, capsys):
    _fails(["recommend", "--run", str(trained_run), "--history", "I001", "--mode", "greedy"], capsys, "unknown mode")


# --------------------------------------------------------------------------------------------------- API


@pytest.fixture(scope="module")
def recommender(trained_run, synth_data):
    from padrec.api import Recommender

    with pytest.MonkeyPatch.context() as mp:
        for k, v in synth_data.env().items():
            mp.setenv(k, v)
        rec = Recommender(trained_run)
        _ = rec.run.dataset, rec._dense_of_raw  # load while the data root is set
    return rec


def test_api_recommend_ok(recommender, synth_data):
    for mode in ("beam", "list"):
        rows = recommender.recommend(["I010", "I011"], k=5, mode=mode)
        assert len(rows) == 5
        assert {r["item"] for r in rows} <= set(synth_data.raw_ids)
        assert len({r["item"] for r in rows}) == 5


def test_api_empty_history(recommender):
    with pytest.raises(PadrecError, match="empty history"):
        recommender.recommend([], k=5)


def test_api_unknown_item(recommender):
    with pytest.raises(PadrecError, match="unknown item"):
        recommender.recommend(["I001", "ZZZ"], k=5)


@pytest.mark.parametrize("mode", ["beam", "list"])
def test_api_k_larger_than_catalogue(recommender, mode):
    with pytest.raises(PadrecError, match="catalogue"):
        recommender.recommend(["I001"], k=61, mode=mode)
    with pytest.raises(PadrecError, match="k must be"):
        recommender.recommend(["I001"], k=0, mode=mode)


def test_api_not_a_run(tmp_path):
    from padrec.api import Recommender

    with pytest.raises(PadrecError, match="not a padrec run"):
        Recommender(tmp_path)
