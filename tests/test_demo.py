"""`padrec demo` end to end on the synthetic dataset with the tiny preset (the real demo runs Beauty/small)."""

import json

from padrec.cli import main


def test_demo_quick_runs_every_step(synth_env, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--from-scratch", "--dataset", "synth", "--preset", "tiny", "--out", str(out), "--quick",
               "--threads", "1"])
    assert rc == 0
    summary = json.loads((out / "results" / "demo.json").read_text())
    modes = [r["mode"] for r in summary["test"]]
    assert modes == ["beam", "list"]
    decoders = [r["decoder"] for r in summary["bench"]["rows"]]
    assert decoders[0] == "ar" and any(d.startswith("sd") for d in decoders)
    assert "sd tree8x2/12cal" in decoders  # the drafts were calibrated first
    assert all((out / "drafts" / name / "acceptance.json").is_file() for name in ("eagle", "padrec"))
    assert {r["draft"] for r in summary["bench"]["rows"]} == {"-", "eagle", "padrec"}
    assert all(r["identical_to_ar"] in ("ref", f"{summary['bench']['users']}/{summary['bench']['users']}")
               for r in summary["bench"]["rows"])
    assert (out / "results" / "training_curve.png").is_file()
    assert (out / "results" / "bench.png").is_file()
    printed = capsys.readouterr().out
    assert "run directory" in printed and str(out) in printed
    fastest = max((r for r in summary["bench"]["rows"] if r["decoder"].startswith("sd ")), key=lambda r: r["speedup"])
    # the console wraps at its width: compare with the line breaks turned back into spaces
    assert f"{fastest['decoder']} with {fastest['draft']}, {fastest['speedup']:.2f}×" in " ".join(printed.split())
