"""The target's greedy lists: validation examples are the target's own lists, agreement along them equals a plain
forward-pass count, training can report and select by it, the CLI writes it; training lists are prompted with
strict prefixes of training sequences, cached, and reach the training set."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from helpers import pin_threads
from padrec.decoding.autoregressive import GenerationConfig, generate_list
from padrec.decoding.trie import ItemTrie
import padrec.drafts.target_lists as tl
from padrec.drafts.target_lists import greedy_list_examples, list_agreement, train_list_examples
from padrec.drafts.registry import load_draft_model
from padrec.drafts.train import DraftTrainConfig, train_draft
from padrec.run import Run
from padrec.training.sequences import IGNORE

SMALL = dict(epochs=1, batch_size=32, warmup_steps=2, max_valid_cases=20, threads=1)


@pytest.fixture(scope="module")
def agree_run(synth_data, trained_run, tmp_path_factory):
    """The tiny trained run with an EAGLE draft and a PAD-Rec draft, the latter scored along lists while training."""
    path = tmp_path_factory.mktemp("agree") / "run"
    shutil.copytree(trained_run, path)
    run = Run(path)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in synth_data.env().items():
            mp.setenv(k, v)
        train_draft(run, DraftTrainConfig(kind="eagle", **SMALL), progress=False)
        res = train_draft(run, DraftTrainConfig(kind="padrec", list_valid_users=6, **SMALL), progress=False)
    pin_threads()
    return run, res


def test_examples_are_the_targets_greedy_lists(synth_env, agree_run):
    run, _ = agree_run
    target = run.load_target().eval()
    examples = greedy_list_examples(run, target, users=4, n_items=3)
    cases = random.Random(0).sample(run.dataset.eval_cases("valid", max_history=run.info.max_history), 4)
    trie = ItemTrie(run.sids.all_item_tokens())
    L = run.sids.vocab.levels
    assert len(examples) == 4
    for (ids, labels), case in zip(examples, cases):
        prompt = run.prompt(case.history)
        listed = generate_list(target, prompt, trie, GenerationConfig(n_items=3)).tokens
        assert ids == prompt + listed
        assert labels[: len(prompt)] == [IGNORE] * len(prompt)
        assert [t for t in labels[len(prompt):] if t != IGNORE] == [t for i, t in enumerate(listed) if i % (L + 1) < L]


def test_step_one_agreement_is_a_plain_forward_count(synth_env, agree_run):
    """Step 1 of `list_agreement` = the draft fed the target's features over the whole list, top-1 vs top-1."""
    run, _ = agree_run
    row = list_agreement(run, ["eagle"], users=5, steps=3, progress=False)[0]
    target = run.load_target().eval()
    model, _ = load_draft_model(run, "eagle")
    same = total = 0
    with torch.no_grad():
        for ids, labels in greedy_list_examples(run, target, users=5):
            x = torch.tensor([ids])
            out = target(input_ids=x, output_hidden_states=True)
            H = out.hidden_states[-1]
            feats = torch.zeros_like(H)
            feats[:, 1:] = H[:, :-1]
            mine = model.logits(model(x, feats))[0].argmax(-1)
            theirs = target.get_output_embeddings()(H)[0].argmax(-1)
            for p in range(len(ids) - 1):
                if labels[p + 1] != IGNORE:
                    same += int(mine[p] == theirs[p])
                    total += 1
    assert row["users"] == 5 and len(row["agreement_by_step"]) == 3
    assert row["agreement_by_step"][0] == pytest.approx(same / total, abs=1e-6)
    assert row["mean"] == pytest.approx(sum(row["agreement_by_step"]) / 3)


def test_training_selects_by_list_agreement(agree_run):
    run, res = agree_run
    last = res["history"][-1]
    assert len(last["list_agreement_by_step"]) == 3 and len(last["list_agreement_per_level"]) == run.sids.vocab.levels
    assert last["valid_score"] == pytest.approx(sum(last["list_agreement_by_step"]) / 3)


def test_cli_writes_the_table(synth_env, agree_run, tmp_path):
    from padrec.cli import main

    run, _ = agree_run
    out = tmp_path / "agree.json"
    assert main(["list-agreement", "--run", str(run.path), "--drafts", "eagle,padrec", "--users", "4",
                 "--steps", "4", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert [r["draft"] for r in res["rows"]] == ["eagle", "padrec"] and res["users"] == 4
    assert all(len(r["agreement_by_step"]) == 4 for r in res["rows"])
    assert main(["list-agreement", "--run", str(run.path), "--drafts", "nope", "--users", "4"]) != 0


def test_training_lists_follow_strict_prefixes_and_are_cached(synth_env, agree_run, tmp_path, monkeypatch):
    src, _ = agree_run
    shutil.copytree(src.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    target = run.load_target().eval()
    L = run.sids.vocab.levels
    examples = train_list_examples(run, target, users=6, n_items=2, progress=False)
    prefixes = {tuple(run.prompt(s[:k])) for s in run.dataset.train_sequences() for k in range(1, len(s))}
    trie = ItemTrie(run.sids.all_item_tokens())
    assert len(examples) == 6
    for ids, labels in examples:
        prompt = ids[: len(ids) - 2 * (L + 1)]
        assert tuple(prompt) in prefixes
        assert ids[len(prompt):] == generate_list(target, prompt, trie, GenerationConfig(n_items=2)).tokens
        assert sum(t != IGNORE for t in labels) == 2 * L
    monkeypatch.setattr(tl, "_list_examples", lambda *a, **k: pytest.fail("regenerated instead of read from cache"))
    assert train_list_examples(run, target, users=6, n_items=2, progress=False) == examples


def test_training_lists_reach_the_training_set(synth_env, agree_run, tmp_path):
    src, _ = agree_run
    shutil.copytree(src.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    pools = [{}, {}]
    for pool, lists in zip(pools, (0, 5)):
        train_draft(run, DraftTrainConfig(kind="eagle", name=f"e{lists}", list_train_users=lists, **SMALL),
                    progress=False, feature_pool=pool)
    (plain,), (with_lists,) = (list(p.values()) for p in pools)
    assert len(with_lists[1]) == len(plain[1]) + 5
    assert with_lists[1][: len(plain[1])] == plain[1]
