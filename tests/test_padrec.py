"""PAD-Rec and multi-step (HASS) training: slots at inference == slots in training, the unrolled training masks ==
a position-by-position reference, every unrolled training step == the session at that tree depth, and a module
with every part off is numerically the base draft."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import perturb as _perturb, pin_threads

from padrec.drafts.eagle import EagleDraft, EagleDraftModel
from padrec.drafts.hass import step_mask, step_mask_reference, unrolled_features
from padrec.drafts.padrec import PadRecDraftModel, PositionConfig
from padrec.drafts.slots import next_run, slot_of, slots_of
from padrec.models.target import build_target
from padrec.tokenizer.vocab import BOS, PAD, SEP

pin_threads()
V = 40
D = 32


def _padrec(levels=3, seed=1, **parts) -> PadRecDraftModel:
    target = build_target(V, "tiny", seed=0)
    pos = PositionConfig(levels=levels, trained_depths=4, **parts)
    return _perturb(PadRecDraftModel.from_target(target, pos, seed=seed), seed)


def _eagle(seed=1) -> EagleDraftModel:
    return _perturb(EagleDraftModel.from_target(build_target(V, "tiny", seed=0), seed=seed), seed)


def _item_sequence(rng: random.Random, levels: int, n_items: int) -> list[int]:
    out = [BOS]
    for _ in range(n_items):
        out += [rng.randrange(4, V) for _ in range(levels)] + [SEP]
    return out


# --- slots ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_incremental_slots_equal_vectorized_slots(seed):
    rng = random.Random(seed)
    levels = rng.randint(1, 4)
    # valid item sequences and arbitrary junk (over-long runs, stray specials) must agree alike
    seqs = [_item_sequence(rng, levels, rng.randint(0, 4)), [rng.randrange(0, V) for _ in range(rng.randint(1, 30))]]
    for seq in seqs:
        run, incremental = 0, []
        for t in seq:
            run = next_run(run, t)
            incremental.append(slot_of(run, t, levels))
        assert slots_of(torch.tensor([seq]), levels)[0].tolist() == incremental
    valid = _item_sequence(rng, levels, 3)
    expect = [levels + 1] + ([*range(levels), levels] * 3)
    assert slots_of(torch.tensor([valid]), levels)[0].tolist() == expect


def test_session_slots_equal_training_slots():
    """The slots a session feeds the module for committed tokens and tree nodes == slots_of(the whole path)."""
    seen = []

    class Recording(PadRecDraftModel):
        """Records the slots of each call (by position), on whichever path the session takes."""

        committed = 0

        def extra(self, h, slots=None, depths=None, position_ids=None):
            seen.append((slots[0].tolist(), position_ids[0].tolist()))
            return super().extra(h, slots, depths, position_ids)

        def _record(self, slots, depths):
            if all(d == 0 for d in depths):  # a commit: consecutive positions after the committed ones
                positions = list(range(self.committed, self.committed + len(slots)))
                self.committed += len(slots)
            else:
                positions = [self.committed - 1 + d for d in depths]
            seen.append((list(slots), positions))

        def session_extra(self):
            inner = super().session_extra()

            def apply(h, slots, depths):
                self._record(slots, depths)
                return inner(h, slots, depths)

            return apply

        def session_fuse(self, w):  # the fused path's folded fusion + module (gate on)
            rows, inner = super().session_fuse(w)

            def apply(tok, feats, slots, depths, zero_first_feature=False):
                self._record(slots, depths)
                return inner(tok, feats, slots, depths, zero_first_feature)

            return rows, apply

    base = _padrec(levels=3)
    model = Recording(base.cfg, base.position.cfg)
    model.load_state_dict(base.state_dict())
    model.eval()
    seq = _item_sequence(random.Random(0), 3, 3)  # 13 tokens
    C = 6  # commit in two pieces, then a two-branch tree: the continuation and an item-ending detour
    s = EagleDraft(model).new_session()
    s.commit(seq[:4], torch.randn(4, D))
    s.commit(seq[4:C], torch.randn(C - 4, D))
    s.propose([-1, -1], [seq[C], SEP], [1, 1])
    s.propose([0, 1], [seq[C + 1], seq[C + 1]], [2, 2])
    by_pos = {}
    for slots, positions in seen:
        for sl, p in zip(slots, positions):
            by_pos.setdefault(p, []).append(sl)
    truth = slots_of(torch.tensor([seq]), 3)[0].tolist()
    for p in range(C + 2):
        assert by_pos[p][0] == truth[p], p
    detour = slots_of(torch.tensor([seq[:C] + [SEP, seq[C + 1]]]), 3)[0].tolist()
    assert by_pos[C][1] == detour[C] and by_pos[C + 1][1] == detour[C + 1]


# --- multi-step masks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_step_masks_equal_the_reference(seed):
    rng = random.Random(seed)
    T = rng.randint(1, 12)
    lengths = [rng.randint(1, T) for _ in range(3)]
    pad = torch.tensor([[1] * n + [0] * (T - n) for n in lengths])
    for step in range(1, 5):
        assert torch.equal(step_mask(pad, step), step_mask_reference(pad, step)), step


# --- unrolled training == decoding -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["eagle", "padrec"])
def test_each_unrolled_step_equals_the_session_at_that_depth(kind):
    """Step j of the unrolled training forward at position C-1+d (d = j-1) gives the same prediction as a session
    that committed the first C tokens and then drafted a chain of d tokens — for a right-padded batch."""
    model = _padrec(levels=3) if kind == "padrec" else _eagle()
    rng = random.Random(3)
    seqs = [_item_sequence(rng, 3, 3), _item_sequence(rng, 3, 2)]
    T = max(map(len, seqs))
    ids = torch.tensor([s + [PAD] * (T - len(s)) for s in seqs])
    pad = (torch.arange(T)[None] < torch.tensor([len(s) for s in seqs])[:, None]).long()
    H = torch.randn(2, T, D, generator=torch.Generator().manual_seed(0))
    feats = torch.zeros_like(H)
    feats[:, 1:] = H[:, :-1]
    steps = 4
    with torch.no_grad():
        outs = unrolled_features(model, ids, feats, pad, steps)
    for b, seq in enumerate(seqs):
        for C in (2, 5, len(seq) - steps + 1):
            s = EagleDraft(model).new_session()
            first = s.commit(seq[:C], feats[b, :C])
            assert torch.allclose(first, model.logits(outs[0][b, C - 1]), atol=1e-4)
            parent = -1
            for d in range(1, steps):
                got = s.propose([parent], [seq[C - 1 + d]], [d])[0]
                parent = d - 1
                want = model.logits(outs[d][b, C - 1 + d])
                assert torch.allclose(got, want, atol=1e-4), (b, C, d)


def test_all_parts_off_is_the_base_draft():
    eagle = _eagle(seed=2)
    off = PadRecDraftModel(eagle.cfg, PositionConfig(levels=3, ipe=False, spe=False))
    missing, unexpected = off.load_state_dict(eagle.state_dict(), strict=False)
    assert not missing and not unexpected  # nothing of the module remains
    off.eval()
    seq = _item_sequence(random.Random(1), 3, 2)
    feats = torch.randn(len(seq), D)
    a, b = EagleDraft(eagle).new_session(), EagleDraft(off).new_session()
    assert torch.equal(a.commit(seq, feats), b.commit(seq, feats))
    assert torch.equal(a.propose([-1, -1], [5, 6], [1, 1]), b.propose([-1, -1], [5, 6], [1, 1]))


def test_parts_change_the_prediction():
    """Each part actually reaches the output (a module wired to nothing would pass the tests above)."""
    seq = _item_sequence(random.Random(2), 3, 2)
    feats = torch.randn(len(seq), D)
    outs = {}
    for name, parts in {"all": {}, "no_ipe": {"ipe": False}, "no_spe": {"spe": False},
                        "add": {"gate": False}}.items():
        s = EagleDraft(_padrec(levels=3, seed=4, **parts)).new_session()
        s.commit(seq, feats)
        outs[name] = s.propose([-1], [7], [1])[0]
    for name in ("no_ipe", "no_spe", "add"):
        assert not torch.allclose(outs["all"], outs[name]), name
