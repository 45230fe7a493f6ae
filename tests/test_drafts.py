"""Drafts: EAGLE session semantics (tree mask == sequential, branches independent, rollback exact, training
layout == session layout), training reduces the loss, save/load round trips, and load_draft's refusals."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import FLOAT32_LOGITS_ATOL, perturb, pin_threads

from padrec import PadrecError
from padrec.drafts.base import Draft
from padrec.drafts.eagle import EagleDraft, EagleDraftModel
from padrec.drafts.lm_draft import LMDraftConfig, build_lm_draft
from padrec.drafts.padrec import PadRecDraftModel, PositionConfig
from padrec.drafts.registry import list_drafts, load_draft, load_draft_model, target_identity
from padrec.drafts.train import DraftTrainConfig, TargetFeatures, check_head_on_features, draft_loss, train_draft
from padrec.models.checkpoint import save_checkpoint
from padrec.models.target import TargetPreset, build_target
from padrec.run import Run
from padrec.tokenizer.semantic_ids import SemanticIDs
from padrec.tokenizer.vocab import SIDVocab
from padrec.training.sequences import IGNORE, collate

pin_threads()
V = 40
CTX = [1, 5, 9, 3, 12, 7, 3]


def _eagle(seed: int = 1) -> EagleDraftModel:
    """A draft with non-trivial random weights (the default init keeps the layer near the identity)."""
    target = build_target(V, "tiny", seed=0)
    return perturb(EagleDraftModel.from_target(target, seed=seed), seed)


def _feats(n: int, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_eagle_chain_equals_sequential_commits():
    draft = EagleDraft(_eagle())
    s = draft.new_session()
    s.commit(CTX, _feats(len(CTX)))
    chain = [4, 6, 8, 10]
    got = [s.propose([-1], [chain[0]], [1])]
    for k in range(1, len(chain)):
        got.append(s.propose([k - 1], [chain[k]], [k + 1]))
    got = torch.cat(got)

    ref_s = draft.new_session()
    ref_s.commit(CTX, _feats(len(CTX)))
    ref = []
    for t in chain:  # commit each token with the draft's own predicted feature of its parent
        ref.append(ref_s.commit([t], ref_s.last_feature[None].clone()))
    assert torch.allclose(got, torch.stack(ref), atol=FLOAT32_LOGITS_ATOL)
    assert got.shape == (len(chain), V)


def test_eagle_two_branch_tree_equals_separate_branches():
    draft = EagleDraft(_eagle())
    s = draft.new_session()
    s.commit(CTX, _feats(len(CTX)))
    l1 = s.propose([-1, -1], [4, 20], [1, 1])  # nodes 0, 1
    l2 = s.propose([0, 1], [6, 22], [2, 2])  # nodes 2, 3
    l3 = s.propose([2, 3, 3], [8, 24, 25], [3, 3, 3])  # nodes 4, 5, 6
    for branch, rows in (([4, 6, 8], [l1[0], l2[0], l3[0]]), ([20, 22, 24], [l1[1], l2[1], l3[1]])):
        b = draft.new_session()
        b.commit(CTX, _feats(len(CTX)))
        ref = [b.propose([-1], [branch[0]], [1]), b.propose([0], [branch[1]], [2]), b.propose([1], [branch[2]], [3])]
        assert torch.allclose(torch.stack(rows), torch.cat(ref), atol=FLOAT32_LOGITS_ATOL)
    b = draft.new_session()
    b.commit(CTX, _feats(len(CTX)))
    ref = [b.propose([-1], [20], [1]), b.propose([0], [22], [2]), b.propose([1], [25], [3])]
    assert torch.allclose(l3[2], ref[2][0], atol=FLOAT32_LOGITS_ATOL)
    with pytest.raises(ValueError):
        s.propose([6], [1], [5])  # wrong depth for its parent


def test_eagle_rollback_restores_exactly():
    draft = EagleDraft(_eagle())
    feats = _feats(len(CTX) + 2)
    s = draft.new_session()
    first = s.commit(CTX, feats[: len(CTX)])
    s.propose([-1, -1], [4, 5], [1, 1])
    s.propose([0], [6], [2])
    s.rollback()
    assert s.cache.get_seq_length() == len(CTX) and s.num_speculative == 0
    again = s.propose([-1], [4], [1])
    fresh = draft.new_session()
    fresh.commit(CTX, feats[: len(CTX)])
    assert torch.equal(again, fresh.propose([-1], [4], [1]))
    s.rollback()
    after = s.commit([11, 13], feats[len(CTX):])  # commit also works in two pieces
    whole = draft.new_session().commit(CTX + [11, 13], feats)
    assert torch.allclose(after, whole, atol=FLOAT32_LOGITS_ATOL)
    assert first.shape == (V,)


def test_training_layout_matches_session():
    """Batched (right-padded) training forward with shifted target features == session.commit."""
    model = _eagle()
    seqs = [CTX, CTX[:4]]
    H = [_feats(len(x), seed=i + 5) for i, x in enumerate(seqs)]
    batch = collate([(x, [IGNORE] * len(x)) for x in seqs])
    Hb = torch.zeros(2, len(CTX), 32)
    for i, h in enumerate(H):
        Hb[i, : len(h)] = h
    feats = torch.zeros_like(Hb)
    feats[:, 1:] = Hb[:, :-1]
    with torch.no_grad():
        out = model.logits(model(batch["input_ids"], feats, attention_mask=batch["attention_mask"]))
    for i, (x, h) in enumerate(zip(seqs, H)):
        shifted = torch.cat([torch.full((1, 32), 7.0), h[:-1]])  # the first feature is ignored (zeroed)
        got = EagleDraft(model).new_session().commit(x, shifted)
        assert torch.allclose(out[i, len(x) - 1], got, atol=FLOAT32_LOGITS_ATOL)


def test_target_head_on_last_hidden_state_is_the_logits():
    target = build_target(V, "tiny", seed=0)
    batch = collate([(CTX, CTX), (CTX[:3], CTX[:3])])
    check_head_on_features(target, batch)  # raises if lm_head(last_hidden_state) != logits


def _random_batch(n=8, length=15, seed=0):
    rng = random.Random(seed)
    ex = []
    for _ in range(n):
        ids = [1] + [rng.randrange(4, V) for _ in range(length - 1)]
        ex.append((ids, [IGNORE] + ids[1:]))
    return collate(ex)


@pytest.mark.parametrize("kind", ["eagle", "hass", "padrec", "lm"])
def test_a_few_steps_reduce_the_loss(kind):
    torch.manual_seed(0)
    target = build_target(V, "tiny", seed=0).eval()
    head = target.get_output_embeddings()
    cfg = DraftTrainConfig(kind=kind, lm_layers=1, lm_hidden=32, lm_heads=2)
    if kind in ("eagle", "hass"):
        model = EagleDraftModel.from_target(target, seed=0)
    elif kind == "padrec":
        model = PadRecDraftModel.from_target(target, PositionConfig(levels=2, trained_depths=cfg.steps), seed=0)
    else:
        model = build_lm_draft(LMDraftConfig(V, layers=1, hidden=32, heads=2))
    batch = _random_batch()
    feats = TargetFeatures(target, [(row, None) for row in batch["input_ids"].tolist()], cache_mb=0)
    H = feats(list(range(8)), batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss, d_logits, t_logits = draft_loss(kind, model, head, batch, H, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(d_logits) == cfg.steps and d_logits[-1].shape == t_logits.shape == (8 * 14, V)
    floor = 0.0  # the soft CE of the EAGLE loss cannot go below the entropy of the target's distribution
    if kind != "lm":
        p = t_logits.softmax(-1)
        floor = cfg.w_token * float(-(p * p.log()).sum(-1).mean())
    assert losses[-1] - floor < 0.6 * (losses[0] - floor), losses


# --- runs: training, saving, loading, refusing --------------------------------------------------------------


def _make_run(path, codebooks=(8, 8), seed=0, preset="tiny", target_seed=0) -> Run:
    vocab = SIDVocab(tuple(codebooks))
    rng = np.random.default_rng(seed)
    combos = np.array([(a, b) for a in range(codebooks[0]) for b in range(codebooks[1])])
    codes = combos[rng.permutation(len(combos))[:60]]  # the synthetic dataset has 60 items
    run = Run.create(path, "synth", {"method": "test"}, SemanticIDs(codes, vocab), max_history=5)
    target = build_target(vocab.size, preset, seed=target_seed)
    save_checkpoint(target, run.target_dir, run.checkpoint_identity())
    return run


SMALL = dict(epochs=2, batch_size=32, warmup_steps=2, max_valid_cases=40, threads=1, lm_layers=1, lm_hidden=32,
             lm_heads=2)


@pytest.fixture(scope="module")
def draft_run(synth_data, tmp_path_factory):
    """A tiny run (random target) with an EAGLE and an LM draft trained for 2 epochs each."""
    run = _make_run(tmp_path_factory.mktemp("drafts") / "run")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in synth_data.env().items():
            mp.setenv(k, v)
        results = {kind: train_draft(run, DraftTrainConfig(kind=kind, **SMALL), progress=False)
                   for kind in ("eagle", "lm", "padrec")}
    pin_threads()
    return run, results


def test_train_draft_writes_a_verified_draft(draft_run):
    run, results = draft_run
    assert list_drafts(run) == ["eagle", "lm", "padrec"]
    for kind, res in results.items():
        hist = res["history"]
        assert [h["epoch"] for h in hist] == [1, 2]
        assert 0.0 <= hist[-1]["valid_agreement"] <= 1.0 and len(hist[-1]["valid_agreement_per_level"]) == 2
        assert hist[-1]["features_cached"]
        meta = json.loads((run.path / "drafts" / kind / "draft.json").read_text())
        assert meta["kind"] == kind and meta["identity"] == target_identity(run)
        assert meta["identity"]["target_hidden_size"] == 32 and "model.safetensors" in meta["files"]
        assert (run.path / "drafts" / f".{kind}.last" / "train_state.pt").is_file()
    assert not [p for p in (run.path / "drafts").iterdir() if ".tmp-" in p.name]


def test_saved_drafts_round_trip(draft_run):
    run, _ = draft_run
    model, meta = load_draft_model(run, "eagle")
    again, _ = load_draft_model(run, "eagle")
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    draft = load_draft(run, "eagle")
    assert isinstance(draft, Draft) and draft.uses_target_features and draft.vocab_size == run.sids.vocab.size
    target = run.load_target()
    assert torch.equal(model.lm_head.weight, target.lm_head.weight)
    assert torch.equal(model.embed.weight, target.model.embed_tokens.weight)
    s = draft.new_session()
    assert s.commit([1, 5, 14, 3], _feats(4)).shape == (run.sids.vocab.size,)

    lm, meta = load_draft_model(run, "lm")
    assert meta["model_config"]["layers"] == 1
    ids = torch.tensor([[1, 5, 14, 3]])
    assert torch.equal(lm(input_ids=ids).logits, load_draft_model(run, "lm")[0](input_ids=ids).logits)


def test_padrec_draft_records_its_parts(draft_run, tmp_path):
    run, results = draft_run
    model, meta = load_draft_model(run, "padrec")
    assert isinstance(model, PadRecDraftModel)
    assert meta["model_config"]["position"] == {"levels": 2, "ipe": True, "spe": True, "gate": True,
                                                "learn_alpha": True, "trained_depths": 3}
    assert len(results["padrec"]["history"][-1]["valid_agreement_by_step"]) == 3
    s = load_draft(run, "padrec").new_session()
    assert s.commit([1, 5, 14, 3], _feats(4)).shape == (run.sids.vocab.size,)
    # draft.json claiming other parts than the weights hold is refused, not silently loaded
    shutil.copytree(run.path, tmp_path / "run")
    other = Run(tmp_path / "run")
    f = other.path / "drafts" / "padrec" / "draft.json"
    meta["model_config"]["position"]["gate"] = False
    f.write_text(json.dumps(meta))
    with pytest.raises(PadrecError, match="cannot load draft weights"):
        load_draft(other, "padrec")


def test_lm_draft_uses_the_shared_adapter(draft_run):
    pytest.importorskip("padrec.drafts.lm_draft_session")
    run, _ = draft_run
    draft = load_draft(run, "lm")
    assert isinstance(draft, Draft) and not draft.uses_target_features
    assert draft.vocab_size == run.sids.vocab.size
    s = draft.new_session()
    assert s.commit([1, 5, 14, 3], None).shape == (run.sids.vocab.size,)
    assert s.propose([-1, -1], [6, 7], [1, 1]).shape == (2, run.sids.vocab.size)


def test_resume_after_interruption(synth_env, draft_run, tmp_path, monkeypatch):
    import padrec.drafts.train as dt

    src, results = draft_run
    shutil.copytree(src.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    shutil.rmtree(run.path / "drafts")
    calls = {"n": 0}
    real = dt.validate

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(dt, "validate", flaky)
    cfg = DraftTrainConfig(kind="eagle", **SMALL)
    with pytest.raises(KeyboardInterrupt):
        train_draft(run, cfg, progress=False)
    assert json.loads((run.path / "drafts" / ".eagle.last" / "draft.json").read_text())["epoch"] == 1
    with pytest.raises(PadrecError, match="different settings"):
        train_draft(run, replace(cfg, lr=5e-3), progress=False)
    # a state saved before a config field existed resumes: the missing field counts as its default
    last = run.path / "drafts" / ".eagle.last" / "draft.json"
    meta = json.loads(last.read_text())
    del meta["config"]["list_valid_users"], meta["config"]["init_from"]
    last.write_text(json.dumps(meta))
    res = train_draft(run, cfg, progress=False)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    # resumed == uninterrupted (same seed, same batches)
    for a, b in zip(res["history"], results["eagle"]["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_warm_start_begins_exactly_at_the_source_draft(synth_env, draft_run, tmp_path):
    """PAD-Rec started from a trained base: with lr 0 the saved draft is the base's weights plus an identity
    module; the metadata names the source."""
    src, _ = draft_run
    shutil.copytree(src.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    cfg = DraftTrainConfig(kind="padrec", name="padrec-warm", init_from="eagle", **{**SMALL, "epochs": 1}, lr=0.0)
    train_draft(run, cfg, progress=False)
    warm, meta = load_draft_model(run, "padrec-warm")
    base, base_meta = load_draft_model(run, "eagle")
    assert meta["started_from"] == {"draft": "eagle", "kind": "eagle", "files": base_meta["files"]}
    for k, v in base.state_dict().items():
        assert torch.equal(warm.state_dict()[k], v), k
    assert not warm.position.slot_embed.weight.any() and not warm.position.step_embed.weight.any()
    ctx = torch.tensor([CTX]) % run.sids.vocab.size
    feats = _feats(len(CTX))[None]
    g = torch.Generator().manual_seed(0)
    slots, depths = torch.randint(0, 4, ctx.shape, generator=g), torch.randint(0, 3, ctx.shape, generator=g)
    assert torch.equal(warm(ctx, feats, slots=slots, depths=depths), base(ctx, feats))


@pytest.mark.parametrize("kind,source,match", [
    ("padrec", "lm", "feature draft"),
    ("eagle", "padrec", "does not fit"),
    ("padrec", "nowhere", "no draft at"),
    ("lm", "eagle", "warm-starts feature drafts"),
    ("eagle", "eagle", "cannot start from itself"),
])
def test_warm_start_refuses_what_does_not_fit(synth_env, draft_run, tmp_path, kind, source, match):
    src, _ = draft_run
    shutil.copytree(src.path, tmp_path / "run")
    cfg = DraftTrainConfig(kind=kind, name=None if source == kind else f"{kind}-warm", init_from=source, **SMALL)
    with pytest.raises(PadrecError, match=match):
        train_draft(Run(tmp_path / "run"), cfg, progress=False)


def _copy_drafts(src: Run, dst: Run) -> None:
    shutil.copytree(src.path / "drafts", dst.path / "drafts")


@pytest.mark.parametrize(
    "change,key",
    [
        (dict(seed=7), "sid_fingerprint"),  # same vocabulary and target weights, other SIDs
        (dict(codebooks=(8, 9)), "vocab_size"),
        (dict(preset=TargetPreset(layers=2, hidden=48, heads=2, intermediate=64)), "target_hidden_size"),
        (dict(target_seed=3), "target_hash"),  # a retrained target
    ],
)
def test_load_draft_refuses_another_target(draft_run, tmp_path, change, key):
    src, _ = draft_run
    other = _make_run(tmp_path / "other", **change)
    _copy_drafts(src, other)
    with pytest.raises(PadrecError, match=key):
        load_draft(other, "eagle")
    if key == "sid_fingerprint":
        assert target_identity(other)["target_hash"] == target_identity(src)["target_hash"]


def test_load_draft_refuses_corrupt_files(draft_run, tmp_path):
    src, _ = draft_run
    shutil.copytree(src.path, tmp_path / "run")
    run = Run(tmp_path / "run")
    f = run.path / "drafts" / "eagle" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(PadrecError, match="corrupt|truncated"):
        load_draft(run, "eagle")
    (run.path / "drafts" / "lm" / "model.safetensors").unlink()
    with pytest.raises(PadrecError, match="missing"):
        load_draft(run, "lm")
    (run.path / "drafts" / "lm" / "draft.json").write_text("{not json")
    with pytest.raises(PadrecError, match="corrupt"):
        load_draft(run, "lm")
    with pytest.raises(PadrecError, match="no draft 'nope'"):
        load_draft(run, "nope")
