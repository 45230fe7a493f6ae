"""`padrec recommend --decoder sd`: speculative beam search gives plain beam search's lists (items, order and
scores) on every user of the split, list mode gives AR's lists, the summary states both paths' throughput, and
combinations that mean nothing exit with 2 and a message."""

from __future__ import annotations

import json

import pytest

from padrec.cli import main


@pytest.fixture
def sd_run(eagle_run):
    return eagle_run


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("k", [3, 6])
def test_strict_speculative_beam_equals_plain_beam_on_every_user(synth_env, sd_run, tmp_path, capsys, k):
    plain, sd = tmp_path / "plain.jsonl", tmp_path / "sd.jsonl"
    common = ["recommend", "--run", str(sd_run), "--mode", "beam", "--beam-size", str(k), "--threads", "1"]
    assert main(common + ["--out", str(plain)]) == 0
    assert main(common + ["--out", str(sd), "--decoder", "sd"]) == 0  # default draft: eagle; default N, γ
    printed = " ".join(capsys.readouterr().out.split())
    p_rows, s_rows = _rows(plain), _rows(sd)
    assert len(s_rows) == len(p_rows) == 80  # every test user of the synthetic dataset
    assert [r["items"] for r in s_rows] == [r["items"] for r in p_rows]
    from padrec.api import Recommender

    rec = Recommender(sd_run)
    cases = rec.run.dataset.eval_cases("test", max_history=rec.run.info.max_history)
    from padrec.evaluation.evaluate import RankConfig

    for c, r in zip(cases[:10], s_rows):
        _, scores = rec.recommend_dense(list(c.history), RankConfig(mode="beam", beam_size=k))
        assert r["scores"] == pytest.approx(scores, abs=1e-4)  # float32: the tree forward's other shapes
    fell = sum(r["fallback"] for r in s_rows)
    assert f"{fell} of 80 users were handed to plain beam search" in printed
    assert "users/s" in printed and "batch-1 latency decoding" in printed


def test_relaxed_is_labelled_not_lossless(synth_env, sd_run, tmp_path, capsys):
    out = tmp_path / "relaxed.jsonl"
    assert main(["recommend", "--run", str(sd_run), "--mode", "beam", "--beam-size", "3", "--limit", "5",
                 "--decoder", "sd", "--verify", "relaxed", "--draft-beams", "6", "--gamma", "2",
                 "--out", str(out)]) == 0
    assert len(_rows(out)) == 5
    assert "NOT plain beam search's answer" in " ".join(capsys.readouterr().out.split())


def test_one_history_through_speculative_beam_search(synth_env, sd_run, capsys):
    import re

    common = ["recommend", "--run", str(sd_run), "--history", "I000,I001", "--mode", "beam", "--beam-size", "3"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    assert main(common + ["--decoder", "sd"]) == 0
    sd = capsys.readouterr().out
    assert "(speculative, draft eagle)" in " ".join(sd.split())
    assert re.findall(r"I\d{3}", sd) == re.findall(r"I\d{3}", plain) != []


BAD = [
    (["--mode", "beam", "--decoder", "sd", "--sample"], "deterministic top-K"),
    (["--mode", "beam", "--decoder", "sd", "--chain", "3"], "deterministic top-K"),
    (["--mode", "beam", "--decoder", "sd", "--draft", "nope"], "no draft 'nope'"),
    (["--mode", "beam", "--decoder", "sd", "--beam-size", "5", "--draft-beams", "2"], "K <= N"),
    (["--mode", "list", "--decoder", "sd", "--gamma", "2"], "--gamma belong to speculative beam search"),
    (["--mode", "beam", "--verify", "strict"], "--verify belong to speculative beam search"),
    (["--mode", "list", "--chain", "3"], "--chain belong to speculative decoding"),
]


@pytest.mark.parametrize("extra,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_combinations_exit_2_with_a_message(synth_env, sd_run, tmp_path, capsys, extra, words):
    rc = main(["recommend", "--run", str(sd_run), "--limit", "2", "--out", str(tmp_path / "x.jsonl"), *extra])
    assert rc == 2
    assert words in capsys.readouterr().err
