"""The speculative path end to end through the CLI: train drafts for a tiny run, then bench them against AR."""

import json
import shutil

from padrec.cli import main


def test_train_drafts_and_bench(synth_env, trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["train-draft", "--run", str(run), "--kind", "eagle", "--epochs", "1"]) == 0
    assert main(["train-draft", "--run", str(run), "--kind", "lm", "--epochs", "1"]) == 0
    out = tmp_path / "bench.json"
    rc = main(["bench", "--run", str(run), "--drafts", "eagle,lm", "--users", "4", "--warmup", "1",
               "--n-items", "3", "--chain", "3", "--tree", "3,2,6;3,2,6,cal", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {(r["decoder"], r["draft"]): r for r in result["rows"]}
    assert ("ar", "-") in rows and ("ar-naive", "-") in rows and ("hf-generate", "-") in rows
    # Hugging Face's own speculative decoders, under the same constraint (stateless: they roll input ids back)
    assert ("hf-assisted", "lm") in rows and ("hf-prompt-lookup10", "-") in rows
    assert ("hf-assisted", "eagle") not in rows  # a feature-level draft is no HF assistant model
    assert ("sd tree3x2/6cal", "eagle") in rows and ("sd tree3x2/6cal", "lm") in rows
    sd = [r for r in result["rows"] if r["decoder"].startswith("sd")]
    assert len(sd) == 6
    # the calibrated tree made bench fit each draft's acceptance table first
    for name in ("eagle", "lm"):
        table = json.loads((run / "drafts" / name / "acceptance.json").read_text())
        assert table["levels"] >= 2 and sum(table["samples"]) > 0  # 2 levels + the collision level
    for r in result["rows"][1:]:
        assert r["identical_to_ar"] == "4/4", r  # lossless: every decoder wrote the AR tokens
    for r in sd:
        assert 1.0 <= r["tau"] <= 3 * 4
        assert all(x is None or 0.0 <= x <= 1.0 for x in r["accept_by_depth"] + r["accept_by_slot"])
    assert out.with_suffix(".png").is_file()
    assert result["command"].startswith("padrec bench --run ")

    # recommend --decoder sd writes the same lists as the autoregressive decoder, plus τ
    ar_out, sd_out = tmp_path / "ar.jsonl", tmp_path / "sd.jsonl"
    common = ["recommend", "--run", str(run), "--mode", "list", "--n-items", "3", "--limit", "6"]
    assert main(common + ["--out", str(ar_out)]) == 0
    assert main(common + ["--out", str(sd_out), "--decoder", "sd", "--draft", "eagle", "--tree", "3,2,6"]) == 0
    ar_rows = [json.loads(x) for x in ar_out.read_text().splitlines()]
    sd_rows = [json.loads(x) for x in sd_out.read_text().splitlines()]
    assert [r["items"] for r in sd_rows] == [r["items"] for r in ar_rows]
    assert all(r["tau"] >= 1.0 for r in sd_rows)
    cal_out = tmp_path / "cal.jsonl"
    assert main(common + ["--out", str(cal_out), "--decoder", "sd", "--draft", "eagle", "--tree", "3,2,6,cal"]) == 0
    assert [json.loads(x)["items"] for x in cal_out.read_text().splitlines()] == [r["items"] for r in ar_rows]

    # `padrec calibrate` refits; a table left from other weights is refused, not silently used
    assert main(["calibrate", "--run", str(run), "--draft", "eagle", "--users", "5"]) == 0
    f = run / "drafts" / "eagle" / "acceptance.json"
    table = json.loads(f.read_text())
    f.write_text(json.dumps({**table, "weights_sha256": "0" * 64}))
    assert main(common + ["--out", str(cal_out), "--decoder", "sd", "--draft", "eagle", "--tree", "3,2,6,cal"]) == 2
    assert "padrec calibrate" in capsys.readouterr().err
    # ... and the remedy the message names works on it
    assert main(["calibrate", "--run", str(run), "--draft", "eagle", "--users", "5"]) == 0
    assert main(common + ["--out", str(cal_out), "--decoder", "sd", "--draft", "eagle", "--tree", "3,2,6,cal"]) == 0
    assert [json.loads(x)["items"] for x in cal_out.read_text().splitlines()] == [r["items"] for r in ar_rows]


def test_bench_refuses_unknown_draft(synth_env, trained_run, capsys):
    assert main(["bench", "--run", str(trained_run), "--drafts", "nope", "--users", "2"]) == 2
    assert "nope" in capsys.readouterr().err
