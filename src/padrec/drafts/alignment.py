"""Top-K alignment of a draft with the target along the target's own beams (AtSpeed), for any draft family.

Speculative beam search accepts a level only if ALL K target beams are among the drafted nodes, so what matters is
not the draft's top-1 agreement but how well its top-K ranking covers the target's (N-to-K verification). AtSpeed
trains the draft on the target's beam-search outputs with one of two losses (REFERENCES.md §3.5-3.6):

  strict  (AtSpeed-S, for strict verification):
          reverse KL  KL(q_K || p_K) over the draft's top-K tokens S, both distributions renormalised on S
          (a proper divergence on the tokens the draft would draft), plus the density regulariser
          -p(s_K) * sum_{s in S} q(s) log q(s), where s_K is the draft's K-th token and p the target: it lowers the
          draft's entropy on S, pushing mass onto a few tokens, weighted by how much the target still likes the
          draft's K-th choice.
  relaxed (AtSpeed-R, for relaxed sampling verification): total-variation distance 1/2 sum |q - p|, whose
          complement is the expected acceptance rate of a sampled token.

Both distributions are the *constrained* next-token distributions (log-softmax over the tokens the trie allows at
that position), the ones every decoder scores with; positions with a single allowed token are skipped.

`BeamAligner` produces the teacher data on the fly: for a few examples of each training batch, the target's top-K
beams for the example's last item (prompt = the window without that item; `beam_search_items_batch`, cached per
example across epochs), then the target and the draft teacher-forced on prompt + beam (through `draft_loss`, so
every draft family's logits come out the way it is trained), and the loss between them.
"""

from __future__ import annotations

import random

import torch

from padrec import PadrecError
from padrec.decoding.beam import beam_search_items_batch
from padrec.drafts.objective import draft_loss
from padrec.training.sequences import IGNORE, collate

__all__ = [
    "ALIGN_MODES",
    "BeamAligner",
    "alignment_loss",
    "constrained_log_softmax",
    "density_regulariser",
    "relaxed_alignment_loss",
    "reverse_kl_topk",
    "strict_alignment_loss",
]

ALIGN_MODES = ("strict", "relaxed")


def constrained_log_softmax(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """log-softmax over the allowed tokens (bool mask like `logits`), -inf elsewhere."""
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    if allowed is not None:
        x = x.masked_fill(~allowed, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def _decisions(allowed: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if allowed is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    return allowed.sum(-1) > 1


def _support(log_q: torch.Tensor, topk: int):
    """The draft's top-K tokens per row and a mask of those that are allowed (finite)."""
    idx = log_q.detach().topk(min(topk, log_q.shape[-1]), dim=-1).indices
    lq = log_q.gather(-1, idx)
    return idx, lq, torch.isfinite(lq)


def reverse_kl_topk(draft_logits, target_logits, allowed=None, topk: int = 10) -> torch.Tensor:
    """Per row: KL(q_S || p_S) on the draft's top-K support S, both renormalised on S. [N]"""
    log_q = constrained_log_softmax(draft_logits, allowed)
    log_p = constrained_log_softmax(target_logits, allowed).detach()
    idx, lq, ok = _support(log_q, topk)
    lp = log_p.gather(-1, idx)
    neg = torch.finfo(lq.dtype).min
    lq_s = torch.log_softmax(lq.masked_fill(~ok, neg), -1)
    lp_s = torch.log_softmax(lp.masked_fill(~ok, neg), -1)
    return torch.where(ok, lq_s.exp() * (lq_s - lp_s), torch.zeros_like(lq_s)).sum(-1)


def density_regulariser(draft_logits, target_logits, allowed=None, topk: int = 10) -> torch.Tensor:
    """Per row: -p(s_K) * sum_{s in S} q(s) log q(s) (unnormalised q on the draft's top-K S; s_K its K-th). [N]"""
    log_q = constrained_log_softmax(draft_logits, allowed)
    p = constrained_log_softmax(target_logits, allowed).detach().exp()
    idx, lq, ok = _support(log_q, topk)
    last = ok.long().sum(-1, keepdim=True).clamp(min=1) - 1  # the K-th allowed choice (rows with < K allowed)
    p_k = p.gather(-1, idx.gather(-1, last)).squeeze(-1)
    lq = lq.masked_fill(~ok, 0.0)  # -inf would turn the masked branch's gradient into NaN
    ent = torch.where(ok, lq.exp() * lq, torch.zeros_like(lq)).sum(-1)
    return -p_k * ent


def strict_alignment_loss(draft_logits, target_logits, allowed=None, topk: int = 10) -> torch.Tensor:
    """AtSpeed-S: mean over decision rows of reverse KL on the draft's top-K + density regulariser."""
    rows = _decisions(allowed, draft_logits.shape[0], draft_logits.device)
    if not rows.any():
        return draft_logits.sum() * 0.0
    d, t = draft_logits[rows], target_logits[rows]
    a = None if allowed is None else allowed[rows]
    return (reverse_kl_topk(d, t, a, topk) + density_regulariser(d, t, a, topk)).mean()


def relaxed_alignment_loss(draft_logits, target_logits, allowed=None) -> torch.Tensor:
    """AtSpeed-R: mean over decision rows of the total-variation distance 1/2 sum |q - p|."""
    rows = _decisions(allowed, draft_logits.shape[0], draft_logits.device)
    if not rows.any():
        return draft_logits.sum() * 0.0
    a = None if allowed is None else allowed[rows]
    q = constrained_log_softmax(draft_logits[rows], a).exp()
    p = constrained_log_softmax(target_logits[rows], a).detach().exp()
    return 0.5 * (q - p).abs().sum(-1).mean()


def alignment_loss(mode: str, draft_logits, target_logits, allowed=None, topk: int = 10) -> torch.Tensor:
    if mode == "strict":
        return strict_alignment_loss(draft_logits, target_logits, allowed, topk)
    if mode == "relaxed":
        return relaxed_alignment_loss(draft_logits, target_logits, allowed)
    raise PadrecError(f"unknown alignment {mode!r}: expected one of {ALIGN_MODES}")


class BeamAligner:
    """The alignment term of one draft training (see the module docstring)."""

    def __init__(self, target, trie, examples, mode: str, topk: int, per_batch: int, seed: int = 0):
        if mode not in ALIGN_MODES:
            raise PadrecError(f"unknown alignment {mode!r}: expected one of {ALIGN_MODES}")
        if topk < 1 or per_batch < 1:
            raise PadrecError(f"alignment needs align_topk >= 1 and align_examples >= 1, got {topk}, {per_batch}")
        self.target, self.trie, self.examples = target, trie, examples
        self.mode, self.topk, self.per_batch = mode, min(topk, trie.num_items), per_batch
        self.rng = random.Random(seed)
        self.beams: dict[int, list[tuple[int, ...]]] = {}

    def prompt(self, i: int) -> list[int]:
        ids = self.examples[i][0]
        return list(ids[: len(ids) - (self.trie.levels + 1)])  # the window minus its last item (+ SEP)

    @torch.no_grad()
    def _teacher(self, idx: list[int]) -> None:
        todo = [i for i in idx if i not in self.beams]
        if todo:
            was = self.target.training
            self.target.eval()
            res = beam_search_items_batch(self.target, [self.prompt(i) for i in todo], self.trie, self.topk,
                                          self.topk, batch_size=len(todo))
            self.target.train(was)
            for i, r in zip(todo, res):
                self.beams[i] = [self.trie.item_tokens[item] for item in r.items]

    def batch(self, idx: list[int]):
        """Teacher-forced sequences (prompt + beam, loss positions = the beam's tokens) and the allowed-token
        mask of every loss position, in `draft_loss`'s row order."""
        pick = self.rng.sample(list(idx), min(self.per_batch, len(idx)))
        self._teacher(pick)
        seqs, masks = [], []
        V = self.target.get_output_embeddings().weight.shape[0]
        for i in pick:
            prompt = self.prompt(i)
            for beam in self.beams[i]:
                seqs.append((prompt + list(beam), [IGNORE] * len(prompt) + list(beam)))
                node = 0
                for tok in beam:
                    row = torch.zeros(V, dtype=torch.bool)
                    row[self.trie.child_tensor[node]] = True
                    masks.append(row)
                    node = self.trie.child_of[node][tok]
        return collate(seqs), torch.stack(masks)

    def loss(self, kind: str, model, head, idx: list[int], cfg) -> torch.Tensor:
        batch, allowed = self.batch(idx)
        with torch.no_grad():
            H = self.target.base_model(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).last_hidden_state
        _, d_logits, t_logits = draft_loss(kind, model, head, batch, H, cfg, steps=1)
        return alignment_loss(self.mode, d_logits[0], t_logits, allowed, self.topk)
