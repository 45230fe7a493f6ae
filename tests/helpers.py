"""Helpers shared by test modules (pytest puts tests/ on sys.path, so `from helpers import ...` works)."""

from __future__ import annotations

import os
import random

import torch

from padrec.speculative.calibration import RANKS, AcceptanceModel

# Tests run torch with this many intra-op threads (default 1, the CI setting). `PADREC_TEST_THREADS=2 make test`
# runs the suite with 2: nothing it asserts may depend on the thread count, which changes how float32 matmuls and
# reductions split their sums.
TEST_THREADS = int(os.environ.get("PADREC_TEST_THREADS", "1"))


# Two float32 implementations of the same function (fused vs module path, a tree vs separate branches) sum their
# products in different orders, so a logit of size ~10 differs by a few float32 ulps of 10 (1.2e-6 each): 3.3e-6 is
# the most seen (AVX-512 and AVX2 kernels, 1 and 2 threads). 5e-5 leaves 15 times that, and an implementation error
# (a wrong mask, position or weight) moves logits by 1e-2 or more.
FLOAT32_LOGITS_ATOL = 5e-5


def assert_same_argmax_where_decided(a: torch.Tensor, b: torch.Tensor, atol: float = FLOAT32_LOGITS_ATOL) -> None:
    """Arg-max equality of two logit tensors in every row where the reference `b` has a top-two gap above 2 * atol:
    closer than that, logits that agree to `atol` may rank either first, depending on the CPU's rounding."""
    top2 = b.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 2 * atol
    assert torch.equal(a.argmax(-1)[decided], b.argmax(-1)[decided])


def pin_threads() -> None:
    """Put torch back on the suite's thread count (CLI commands under test set their own)."""
    torch.set_num_threads(TEST_THREADS)


def perturb(model, seed: int, scale: float = 0.3):
    """Non-trivial random weights for a freshly built draft (the default init keeps the decoder layer near the
    identity and new embeddings near 0, which would make many tests pass vacuously). Frozen weights (the target's
    LM head, frozen embeddings) stay as they are."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model.eval()


class FeatureRecordingDraft:
    """The target as a draft that declares `uses_target_features` (the EAGLE-family path: the target goes first and
    hands its features to commit). It records every committed (tokens, features) pair in `log`, runs `check` on
    them if given, and asserts that a node's parent comes from an earlier propose call (as EAGLE needs: the
    parent's predicted feature must exist)."""

    uses_target_features = True
    name = "feature-recorder"

    def __init__(self, model, check=None):
        from padrec.speculative import ModelDraft

        self.inner = ModelDraft(model)
        self.check = check
        self.log: list[tuple[list[int], torch.Tensor]] = []

    def new_session(self):
        from padrec.drafts.base import DraftSession

        inner, log, check = self.inner.new_session(), self.log, self.check

        class _Session(DraftSession):
            n_spec = 0

            def commit(self, tokens, features):
                assert features is not None and features.shape[0] == len(tokens)
                log.append((list(tokens), features.clone()))
                if check is not None:
                    check(tokens, features)
                self.n_spec = 0
                return inner.commit(tokens, None)

            def propose(self, parents, tokens, depths):
                assert all(p < self.n_spec for p in parents)
                self.n_spec += len(tokens)
                return inner.propose(parents, tokens, depths)

            def rollback(self):
                self.n_spec = 0
                inner.rollback()

        return _Session()

    @property
    def vocab_size(self):
        return self.inner.vocab_size


class RandomLogitsDraft:
    """A draft that knows nothing: seeded random logits for every commit and node. Speculative decoding with it
    must still give the target's output (only slower)."""

    name = "random-logits"
    uses_target_features = False

    def __init__(self, vocab: int, seed: int = 0):
        self._vocab, self.seed = vocab, seed

    def new_session(self):
        from padrec.drafts.base import DraftSession

        vocab, gen = self._vocab, torch.Generator().manual_seed(self.seed)

        class _Session(DraftSession):
            def commit(self, tokens, features):
                return 2 * torch.randn(vocab, generator=gen)

            def propose(self, parents, tokens, depths):
                return 2 * torch.randn(len(tokens), vocab, generator=gen)

            def rollback(self):
                pass

        return _Session()

    @property
    def vocab_size(self):
        return self._vocab


def random_acceptance(levels: int, seed: int) -> AcceptanceModel:
    """A valid table with random edges and rank probabilities (for property tests of calibrated trees)."""
    rng = random.Random(seed)
    edges, probs = [], []
    for _ in range(levels):
        cuts = sorted(rng.uniform(0, 2) for _ in range(rng.randint(0, 3)))
        rows = []
        for _ in range(len(cuts) + 1):
            w = [rng.random() for _ in range(RANKS + 1)]
            rows.append([x / sum(w) for x in w[:RANKS]])
        edges.append(cuts)
        probs.append(rows)
    return AcceptanceModel(levels=levels, edges=edges, probs=probs, samples=[0] * levels)
