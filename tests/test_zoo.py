"""The model zoo: pack a trained run (16-bit weights only where no decoded list changes, drafts re-tied, manifest
hashing every file), list and copy it, use it as `--run zoo:NAME`, and refuse a corrupt or foreign one."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from padrec import PadrecError, zoo
from padrec.cli import main


@pytest.fixture(scope="module")
def packed(synth_data, trained_run, tmp_path_factory):
    """A tiny run with a calibrated EAGLE draft, packed into a temporary zoo as `synth`."""
    base = tmp_path_factory.mktemp("zoo")
    run = base / "run"
    shutil.copytree(trained_run, run)
    env = {**synth_data.env(), "PADREC_ZOO_DIR": str(base / "zoo"), "PADREC_ZOO_COPIES": str(base / "copies")}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["train-draft", "--run", str(run), "--kind", "eagle", "--epochs", "1"]) == 0
        assert main(["calibrate", "--run", str(run), "--draft", "eagle", "--users", "10"]) == 0
        assert main(["zoo", "pack", "--run", str(run), "--name", "synth", "--check-users", "0",
                     "--made-by", "padrec train-target --preset tiny"]) == 0
        # the tiny target's beam-20 lists hold near-ties that 16 bits reorder, so it ships in float32; the 16-bit
        # path is packed as if every checked list had been equal
        import padrec.zoo_pack as zp

        mp.setattr(zp, "lists_unchanged", lambda run, a, b, users: {"beam20": {"users": 1, "identical": 1}})
        assert main(["zoo", "pack", "--run", str(run), "--name", "synth16", "--check-users", "1"]) == 0
    return {"run": run, "zoo": base / "zoo", "env": env}


@pytest.fixture
def zoo_env(packed, monkeypatch):
    for k, v in packed["env"].items():
        monkeypatch.setenv(k, v)
    return packed


def test_pack_writes_a_manifest_that_hashes_every_file(zoo_env):
    path = zoo_env["zoo"] / "synth"
    m = zoo.verify(path)
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == on_disk
    assert {"run.json", "sids.json", "target/model.safetensors", "drafts/eagle/model.safetensors",
            "drafts/eagle/acceptance.json", "results/eval_test.json"} <= on_disk
    assert m["commands"] == ["padrec train-target --preset tiny"] and m["machine"]["cpu_count"]
    labels = [r["label"] for r in m["test"]]
    assert labels[:2] == ["target beam20", "target list10"] and "MostPop" in labels
    check = m["target"]["check"]
    assert all(c["users"] > 0 for c in check.values())


def _dtypes(path) -> set:
    with safe_open(str(path), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys() if f.get_tensor(k).is_floating_point()}


@pytest.mark.parametrize("name", ["synth", "synth16"])
def test_16_bit_weights_only_where_every_checked_list_is_unchanged(zoo_env, name):
    m = zoo.read_manifest(zoo_env["zoo"] / name)
    same = all(c["identical"] == c["users"] for c in m["target"]["check"].values())
    assert same == (name == "synth16")
    assert m["target"]["stored"] == ("float16" if same else "float32")
    assert _dtypes(zoo_env["zoo"] / name / "target" / "model.safetensors") == {torch.float16 if same else torch.float32}
    assert _dtypes(zoo_env["zoo"] / name / "drafts" / "eagle" / "model.safetensors") == {torch.float16}


@pytest.mark.parametrize("name", ["synth", "synth16"])
def test_a_zoo_model_computes_in_float32_with_the_weights_it_stores(zoo_env, name):
    from padrec.run import Run

    shipped = Run(f"zoo:{name}").load_target()
    original = Run(zoo_env["run"]).load_target()
    for (param, a), b in zip(shipped.named_parameters(), original.parameters()):
        assert a.dtype == torch.float32
        assert torch.equal(a, b.to(torch.float16).float() if name == "synth16" else b), param


def test_every_command_takes_zoo_name_and_writes_only_to_the_copy(zoo_env, tmp_path):
    before = zoo.read_manifest(zoo_env["zoo"] / "synth")
    assert main(["evaluate", "--run", "zoo:synth", "--limit", "5", "--mode", "list"]) == 0
    copy = zoo.copies_root() / "synth"
    assert (copy / "results" / "eval_test.json").is_file()
    out = tmp_path / "bench.json"
    assert main(["bench", "--run", "zoo:synth", "--drafts", "eagle", "--users", "3", "--warmup", "1",
                 "--n-items", "3", "--chain", "2", "--tree", "", "--no-hf", "--no-naive", "--out", str(out)]) == 0
    zoo.verify(zoo_env["zoo"] / "synth", before)  # the shipped files are untouched
    assert main(["zoo", "add-bench", "synth", str(out)]) == 0
    m = zoo.verify(zoo_env["zoo"] / "synth")
    assert m["speed"]["identical_to_ar"] == "3/3" and "results/bench.json" in m["files"]
    from padrec.api import Recommender

    recs = Recommender("zoo:synth").recommend(["I000", "I001", "I002"], k=3, mode="beam")
    assert len(recs) == 3


def test_list_and_copy(zoo_env, tmp_path, capsys):
    assert main(["zoo", "list"]) == 0
    assert "synth" in capsys.readouterr().out
    assert main(["zoo", "copy", "synth", str(tmp_path / "mine")]) == 0
    assert (tmp_path / "mine" / "target" / "model.safetensors").is_file()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["zoo", "copy", "synth", str(tmp_path / "other")]) == 2
    assert "other files" in capsys.readouterr().err


def test_a_corrupt_zoo_model_is_refused_with_the_fix(zoo_env, tmp_path, monkeypatch):
    bad = tmp_path / "zoo"
    shutil.copytree(zoo_env["zoo"], bad)
    monkeypatch.setenv("PADREC_ZOO_DIR", str(bad))
    monkeypatch.setenv("PADREC_ZOO_COPIES", str(tmp_path / "copies"))
    f = bad / "synth" / "drafts" / "eagle" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(PadrecError, match="sha256.*git checkout"):
        zoo.resolve_run("zoo:synth")
    with pytest.raises(PadrecError, match="no model 'nope'"):
        zoo.resolve_run("zoo:nope")


def test_tokenize_into_a_zoo_model_is_refused(zoo_env, capsys):
    assert main(["tokenize", "--dataset", "synth", "--run", "zoo:synth"]) == 2
    assert "zoo copy" in capsys.readouterr().err


def test_add_bench_refuses_a_bench_of_another_run(zoo_env, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--run", str(zoo_env["run"]), "--drafts", "eagle", "--users", "2", "--warmup", "1",
                 "--n-items", "2", "--chain", "2", "--tree", "", "--no-hf", "--no-naive", "--out", str(out)]) == 0
    assert main(["zoo", "add-bench", "synth", str(out)]) == 2
    assert "not measured on a copy" in capsys.readouterr().err
    json.loads(out.read_text())


def test_the_zoo_demo_shows_quality_beside_the_baselines_and_speed(zoo_env, capsys):
    assert main(["demo", "--zoo", "synth", "--users", "6", "--bench-users", "2", "--threads", "1"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "MostPop" in printed and "target beam20" in printed and "fastest speculative configuration" in printed
    summary = json.loads((zoo.copies_root() / "synth" / "results" / "demo.json").read_text())
    assert all(r["identical_to_ar"] in ("ref", "2/2") for r in summary["bench"]["rows"])


def test_tree_labels_parse_back():
    from padrec.speculative.tree import TreeConfig

    for label in ("chain8", "tree16x4/48cal@0.1", "tree5x4/24", "tree8x2/12cal"):
        assert TreeConfig.from_label(label).label == label
    with pytest.raises(PadrecError, match="not a tree label"):
        TreeConfig.from_label("chain")
