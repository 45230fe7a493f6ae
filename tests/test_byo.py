"""Bring your own trained recommender (padrec.byo): LC-Rec / MiniOneRec-style checkpoints, built here by a stand-in
for the user's own training code (benchmarks/lcrec_style.py), imported as they are. Two styles: a LLaMA with an
Alpaca prompt and a BOS-adding tokenizer, and a Qwen2 (tied embeddings) with a chat template. Through the CLI:
import -> train drafts -> bench -> recommend, speculative lists identical to autoregressive ones, strict speculative
beam identical to beam search, parity with Hugging Face generate; and every refusal of a checkpoint that cannot be
decoded losslessly as it is."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import _synth_env
from helpers import FLOAT32_LOGITS_ATOL, pin_threads
from padrec.cli import main
from padrec.run import Run

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lcrec_style", ROOT / "benchmarks" / "lcrec_style.py")
lcrec_style = importlib.util.module_from_spec(_spec)
sys.modules["lcrec_style"] = lcrec_style
_spec.loader.exec_module(lcrec_style)

STYLES = {"alpaca-llama": ("alpaca", "llama"), "chat-qwen2": ("chat", "qwen2")}


def _codes(n: int) -> list[list[int]]:
    return [[i // 16, (i // 4) % 4, i % 4] for i in range(n)]  # 3 levels of 4 codes: 64 >= the 60 synthetic items


def _build(out: Path, dataset, style: str, arch: str, epochs: int = 4) -> Path:
    res = lcrec_style.build_checkpoint(out, dataset, _codes(dataset.num_items), style=style, arch=arch,
                                       epochs=epochs, log=lambda *_: None)
    pin_threads()
    return Path(res["manifest"])


@pytest.fixture(scope="session", params=sorted(STYLES))
def imported(request, synth_data, tmp_path_factory):
    """(manifest, run dir) of an imported checkpoint with an EAGLE and a PAD-Rec(HASS) draft, made through the CLI.
    Tests must not write into the run except under results/."""
    from padrec.data.dataset import load_dataset

    style, arch = STYLES[request.param]
    base = tmp_path_factory.mktemp(request.param)
    with _synth_env(synth_data):
        manifest = _build(base / "checkpoint", load_dataset(synth_data.name), style, arch)
        run = base / "run"
        assert main(["import-model", "--manifest", str(manifest), "--dataset", synth_data.name,
                     "--run", str(run)]) == 0
        for kind in ("eagle", "padrec"):
            assert main(["train-draft", "--run", str(run), "--kind", kind, "--epochs", "2", "--threads", "1"]
                        ) == 0  # padrec: on HASS, the default base
    pin_threads()
    return manifest, run


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_prompts_are_the_checkpoints_own_tokens_renamed(synth_env, imported):
    _, run_dir = imported
    run = Run(run_dir)
    imp = run.imported
    assert run.vocab_size == len(imp.tokenizer) == len(imp.hf_of_dense)
    assert sorted(imp.hf_of_dense) == list(range(run.vocab_size))  # a permutation: nothing merged, nothing lost
    case = run.dataset.eval_cases("test")[0]
    hf = imp.renderer.hf_ids(case.history)
    dense = run.prompt(case.history)
    assert [imp.hf_of_dense[t] for t in dense] == hf
    text = imp.tokenizer.decode(hf)
    for item in case.history[-run.info.max_history:]:
        assert "".join(imp.renderer.item_strings[item]) in text
    # the SID tokens inside the prompt are the dense ids of those items
    flat = [t for item in case.history[-run.info.max_history:] for t in run.sids.item_tokens(item)]
    sid_positions = [t for t in dense if 4 <= t < run.sids.vocab.size]
    assert sid_positions == flat


def test_the_renamed_model_computes_the_checkpoints_logits(synth_env, imported):
    from transformers import AutoModelForCausalLM

    _, run_dir = imported
    run = Run(run_dir)
    perm = torch.tensor(run.imported.hf_of_dense)
    case = run.dataset.eval_cases("test")[1]
    hf_ids = torch.tensor([run.imported.renderer.hf_ids(case.history)])
    original = AutoModelForCausalLM.from_pretrained(run.imported.manifest.model_dir, local_files_only=True).eval()
    renamed = run.load_target()
    with torch.inference_mode():
        a = original(input_ids=hf_ids).logits[0]
        b = renamed(input_ids=torch.tensor([run.prompt(case.history)])).logits[0]
    torch.testing.assert_close(b, a[:, perm], atol=FLOAT32_LOGITS_ATOL, rtol=0)


def test_speculative_lists_equal_autoregressive_ones(synth_env, imported, tmp_path):
    _, run_dir = imported
    common = ["recommend", "--run", str(run_dir), "--threads", "1", "--limit", "30"]
    out = {}
    for name, extra in {"ar": ["--mode", "list"],
                        "chain": ["--mode", "list", "--decoder", "sd", "--draft", "eagle", "--chain", "4"],
                        "tree": ["--mode", "list", "--decoder", "sd", "--draft", "padrec", "--tree", "3,2,8"],
                        "beam": ["--mode", "beam", "--beam-size", "5"],
                        "sd-beam": ["--mode", "beam", "--beam-size", "5", "--decoder", "sd", "--draft", "eagle"]
                        }.items():
        path = tmp_path / f"{name}.jsonl"
        assert main(common + extra + ["--out", str(path)]) == 0, name
        out[name] = [r["items"] for r in _rows(path)]
    assert len(out["ar"]) == 30 and all(len(x) == 10 for x in out["ar"])
    assert out["chain"] == out["ar"] and out["tree"] == out["ar"]
    assert out["sd-beam"] == out["beam"]


def test_the_python_api_serves_an_imported_model(synth_env, imported):
    from padrec.api import Recommender

    _, run_dir = imported
    rec = Recommender(run_dir)
    history = list(synth_env.raw_ids[:3])
    for mode in ("beam", "list"):
        plain = rec.recommend(history, k=5, mode=mode)
        fast = rec.recommend(history, k=5, mode=mode, decoder="sd", draft="eagle")
        assert [r["item"] for r in fast] == [r["item"] for r in plain] and len(plain) == 5
        assert set(r["item"] for r in plain) <= set(synth_env.raw_ids)


def test_bench_on_an_imported_model_has_every_list_equal(synth_env, imported):
    _, run_dir = imported
    out = Path(run_dir) / "results" / "bench_byo_test.json"
    assert main(["bench", "--run", str(run_dir), "--drafts", "eagle,padrec", "--users", "4", "--chain", "3",
                 "--tree", "3,2,8", "--threads", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    sd = [r for r in rows if r["decoder"].startswith("sd")]
    assert len(sd) == 4 and all(r["identical_to_ar"] == "4/4" for r in sd)


def test_padrec_slots_are_depths_in_the_item_path_not_token_strings(synth_env, imported):
    from padrec.drafts.registry import load_draft_model
    from padrec.drafts.slots import slots_of

    _, run_dir = imported
    run = Run(run_dir)
    model, _ = load_draft_model(run, "padrec")
    assert model.sid_end == run.sids.vocab.size < run.vocab_size  # text ids follow the SID ids
    case = run.dataset.eval_cases("test")[0]
    prompt = torch.tensor([run.prompt(case.history)])
    slots = slots_of(prompt, run.sids.vocab.levels, model.sid_end)[0].tolist()
    is_sid = [4 <= t < run.sids.vocab.size for t in prompt[0].tolist()]
    L = run.sids.vocab.levels
    assert [s for s, sid in zip(slots, is_sid) if sid] == list(range(L)) * min(len(case.history), run.info.max_history)
    assert all(s == L + 1 for s, sid, t in zip(slots, is_sid, prompt[0].tolist()) if not sid and t != 3)


def test_parity_with_hugging_face_generate(synth_env, imported, capsys):
    _, run_dir = imported
    out = Path(run_dir) / "results" / "parity_test_k1.json"
    # one beam is greedy decoding: both conventions rank the allowed tokens alike, so every list must agree
    assert main(["parity", "--run", str(run_dir), "--users", "20", "--beam-k", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["users"] == 20 and rep["identical"] == 20
    out5 = Path(run_dir) / "results" / "parity_test_k5.json"
    assert main(["parity", "--run", str(run_dir), "--users", "20", "--beam-k", "5", "--out", str(out5)]) == 0
    rep = json.loads(out5.read_text())
    assert set(rep["causes"]) <= {"same", "same items, other order", "convention", "search"}
    assert sum(rep["causes"].values()) == 20 and rep["causes"].get("same", 0) == rep["identical"]
    assert "identical lists" in capsys.readouterr().out


def test_a_changed_checkpoint_is_refused_at_load(synth_env, imported, tmp_path):
    manifest, _ = imported
    copy = tmp_path / "checkpoint"
    shutil.copytree(manifest.parent, copy)
    run = tmp_path / "run"
    assert main(["import-model", "--manifest", str(copy / "manifest.json"), "--dataset", synth_env.name,
                 "--run", str(run)]) == 0
    weights = next((copy / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(Exception, match="changed since `padrec import-model`"):
        Run(run).load_target()


# ---- refusals ------------------------------------------------------------------------------------------------

def _edit(manifest: Path, tmp_path: Path, change) -> Path:
    """A copy of the checkpoint folder with `change(folder, manifest dict)` applied; returns its manifest."""
    copy = tmp_path / "edited"
    shutil.copytree(manifest.parent, copy)
    m = json.loads((copy / "manifest.json").read_text())
    change(copy, m)
    (copy / "manifest.json").write_text(json.dumps(m))
    return copy / "manifest.json"


def _index_edit(fn):
    def change(folder, m):
        index = json.loads((folder / "index.json").read_text())
        fn(index)
        (folder / "index.json").write_text(json.dumps(index))
    return change


def _config_edit(fn):
    def change(folder, m):
        cfg = json.loads((folder / "model" / "config.json").read_text())
        fn(cfg)
        (folder / "model" / "config.json").write_text(json.dumps(cfg))
    return change


def _adapter(modules):
    def change(folder, m):
        (folder / "model" / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "base_model_name_or_path": "Qwen/Qwen2.5-1.5B", "target_modules": ["q_proj"],
             "modules_to_save": modules}))
    return change


def _lstrip_tokenizer(folder, m):
    """SID tokens that swallow the space before them, and a prompt that ends with one: the boundary merges."""
    from padrec.data.dataset import load_dataset

    ds = load_dataset("synth")
    sids = lcrec_style.sid_strings(_codes(ds.num_items))
    lcrec_style.build_tokenizer(folder / "model", [lcrec_style.ALPACA], sids, "alpaca", sid_lstrip=True)
    m["prompt"] = lcrec_style.ALPACA.rstrip("\n") + " "
    m.pop("chat", None)


REFUSALS = {
    "not one token": (_index_edit(lambda ix: ix.__setitem__(next(iter(ix)), ["<z_9>", "<b_0>", "<c_0>"])),
                      "is not one token"),
    "colliding SIDs": (_index_edit(lambda ix: ix.__setitem__(list(ix)[1], ix[list(ix)[0]])), "share"),
    "item missing": (_index_edit(lambda ix: ix.pop(next(iter(ix)))), "not in the item index"),
    "uneven lengths": (_index_edit(lambda ix: ix.__setitem__(next(iter(ix)), ix[next(iter(ix))][:2])),
                       "same number of SID tokens"),
    "vocab too small": (_config_edit(lambda c: c.__setitem__("vocab_size", 100)), "resize"),
    "quantised": (_config_edit(lambda c: c.__setitem__("quantization_config", {"quant_method": "bitsandbytes",
                                                                                "bits": 4})), "lossless"),
    "lora with rows": (_adapter(["embed_tokens", "lm_head"]), "merge it into its base"),
    "lora without rows": (_adapter([]), "SID tokens added to the tokenizer have no trained rows"),
    "no history slot": (lambda f, m: m.update(prompt="no slot", chat=None), "{history}"),
    "item_end unknown": (lambda f, m: m.update(item_end="<nothing>"), "item_end"),
    "boundary merge": (_lstrip_tokenizer, "merge into other tokens"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_import_refuses_with_a_message_that_says_how_to_fix_it(synth_env, imported, tmp_path, capsys, case):
    manifest, _ = imported
    change, words = REFUSALS[case]
    edited = _edit(manifest, tmp_path, change)
    rc = main(["import-model", "--manifest", str(edited), "--dataset", synth_env.name, "--run", str(tmp_path / "r")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and words in err, err
    assert not (tmp_path / "r" / "run.json").exists()


def test_an_imported_target_is_not_retrained(synth_env, imported, capsys):
    _, run_dir = imported
    assert main(["train-target", "--run", str(run_dir), "--epochs", "1"]) == 2
    assert "imported checkpoint" in capsys.readouterr().err
