"""Lossless speculative list-wise generation: `speculative_generate`.

A round:
  1. the draft catches up on the committed tokens (`commit`) and builds a tree below the last committed token
     (`build_tree`: one `propose` per level), every node constrained like the real list;
  2. the target verifies the pending tokens + the tree in one forward (`TargetSession.verify`);
  3. acceptance (`accept_tree`): greedy = the target's own arg-max path, sampling = recursive rejection sampling;
     the first target decision without a matching child gives the bonus token;
  4. commit: the accepted tokens and the bonus advance the constraint; the tokens the constraint then forces
     (e.g. SEP after an item's last level) are committed at once, with no model decision; the target keeps pending +
     accepted path in its cache (the bonus and forced tokens become the next round's pending tokens); the draft
     rolls back its speculative nodes.

Greedy output equals `generate_list` token for token; sampled lists are distributed exactly as autoregressive
sampling from the target (see `padrec.speculative.verify`). The list stops at exactly n_items * (L + 1) tokens: the
tree is never deeper than the tokens still missing.

Draft features (`draft.uses_target_features`): `features[i]` is the target's last hidden state at the position
before token i (zeros for the prompt's first token, which has no predecessor). The target is first prefilled with
the prompt minus its last token, so the whole prompt can be committed to the draft with real features. A token's
feature is known once the target has processed its predecessor; committed tokens whose feature is not known yet
(the forced tokens after a bonus) are given to the draft as a speculative chain at the start of the next tree
(depth offset), and committed, with their real features, after the next verification. Drafts without features get
every committed token at once (features None), and the prompt is verified together with the first tree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from padrec import PadrecError
from padrec.decoding.autoregressive import GenerationConfig, check_prompt, make_constraint
from padrec.decoding.trie import ItemTrie
from padrec.drafts.base import Draft
from padrec.speculative.tree import DraftTree, TreeConfig, build_tree
from padrec.speculative.verify import TargetSession, accept_tree

__all__ = ["SpecConfig", "SpecResult", "speculative_generate"]


@dataclass(frozen=True)
class SpecConfig:
    # a chain of 8: the fastest shape measured on the CPU and the GPU (README, "Calibrated trees"); a tree verifies
    # more tokens per round and builds each level with a sequential draft step
    tree: TreeConfig = field(default_factory=lambda: TreeConfig.chain(8))
    trace: bool = False  # keep every round's tree / path / bonus in SpecResult.trace (tests, analysis)


@dataclass
class SpecResult:
    items: list[int]
    tokens: list[int]  # n_items * (L + 1), like GenerationResult.tokens
    target_calls: int  # target forwards (prefill included)
    draft_calls: int  # draft forwards (commit + propose calls)
    accepted_per_round: list[int]  # draft tokens accepted per round (bonus and forced tokens excluded)
    stats: dict
    trace: list[dict] | None = None

    @property
    def model_calls(self) -> int:  # GenerationResult-compatible name
        return self.target_calls


def check_draft(target, draft: Draft) -> None:
    head = target.get_output_embeddings()
    v_target = int(head.weight.shape[0]) if head is not None and hasattr(head, "weight") else target.config.vocab_size
    if draft.vocab_size != v_target:
        raise PadrecError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({v_target})")


def _hidden_size(target) -> int:
    head = target.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[1])
    return int(target.config.hidden_size)


class _AcceptanceStats:
    """Attempts and accepts per draft depth 1..D and per within-item slot 0..L (L = SEP): a depth is attempted
    when the walk got to its parent and the parent has children in the tree."""

    def __init__(self, depth: int, levels: int):
        self.levels = levels
        self.by_depth = [[0, 0] for _ in range(depth)]
        self.by_slot = [[0, 0] for _ in range(levels + 1)]

    def record(self, tree: DraftTree, path: list[int], start: int) -> None:
        node, reached = -1, 0
        for d in range(1, tree.max_depth + 1):
            if not tree.children.get(node):
                break
            slot = (start + d - 1) % (self.levels + 1)
            self.by_depth[d - 1][0] += 1
            self.by_slot[slot][0] += 1
            if len(path) < d:
                break
            self.by_depth[d - 1][1] += 1
            self.by_slot[slot][1] += 1
            node, reached = path[d - 1], d
        assert reached == len(path)


class _ListDecode:
    """One speculative list in progress: the committed tokens and their constraint, the target and draft
    sessions, the target features handed to the draft, and the round statistics."""

    def __init__(self, target, draft: Draft, prompt: list[int], trie: ItemTrie, cfg: GenerationConfig,
                 spec: SpecConfig, history):
        self.draft, self.cfg, self.spec = draft, cfg, spec
        self.cons = make_constraint(trie, prompt, cfg, history)
        self.total = cfg.n_items * (trie.levels + 1)
        self.defer = bool(draft.uses_target_features)
        self.seq, self.n_prompt = list(prompt), len(prompt)  # prompt + generated tokens (all committed)
        self.tsess, self.session = TargetSession(target), draft.new_session()
        # defer only: row i + 1 = the target's hidden state at cached position i, row 0 = zeros, so the features
        # of tokens a..b-1 (each paired with the state before it) are the slice [a:b], with no per-round stacking
        self.feat_rows = None
        if self.defer:
            self.feat_rows = torch.empty(self.n_prompt + self.total + 1, _hidden_size(target),
                                         dtype=self.tsess.dtype, device=self.tsess.device)
            self.feat_rows[0] = 0.0
        self.draft_n = self.draft_calls = 0  # committed tokens the draft has; its forwards
        self.draft_time = self.target_time = 0.0
        self.accepted_per_round: list[int] = []
        self.tree_sizes: list[int] = []
        self.stats = _AcceptanceStats(spec.tree.depth, trie.levels)
        self.trace: list[dict] | None = [] if spec.trace else None

    def n_gen(self) -> int:
        return len(self.seq) - self.n_prompt

    def commit_token(self, tok: int) -> None:
        self.cons.advance(tok)
        self.seq.append(tok)

    def commit_forced(self) -> None:
        """Commit the tokens the constraint forces (a single allowed token), with no model decision."""
        while self.n_gen() < self.total:
            toks, _ = self.cons.allowed_with_tensor()
            if len(toks) != 1:
                return
            self.commit_token(toks[0])

    def prefill(self) -> None:
        if self.defer and self.n_prompt > 1:
            t0 = time.perf_counter()
            _, feats = self.tsess.prefill(self.seq[:-1])
            self.target_time += time.perf_counter() - t0
            self.feat_rows[1 : 1 + len(feats)] = feats
        self.commit_forced()

    def draft_tree(self) -> DraftTree:
        """The draft catches up on the committed tokens and builds its tree below the last one."""
        t0 = time.perf_counter()
        seq, session = self.seq, self.session
        upto = min(len(seq), self.tsess.length + 1) if self.defer else len(seq)
        if upto > self.draft_n:
            feats = self.feat_rows[self.draft_n:upto] if self.defer else None
            self._droot = session.commit(seq[self.draft_n:upto], feats)
            self.draft_calls += 1
            self.draft_n = upto
        # committed tokens whose features are not known yet: a speculative chain for the draft, one node per call
        # (a feature-level draft needs the parent's predicted feature before it can run a node)
        offset = len(seq) - self.draft_n
        for j, tok in enumerate(seq[self.draft_n:]):
            self._droot = session.propose([j - 1], [tok], [j + 1])[-1]
            self.draft_calls += 1

        def propose(parents, tokens, depths):  # tree-local indices -> the session's (after the chain)
            parents = [p + offset if p >= 0 else offset - 1 for p in parents]
            return session.propose(parents, tokens, [d + offset for d in depths])

        tree = build_tree(self._droot, self.cons, self.cfg, self.spec.tree, propose,
                          max_depth=self.total - self.n_gen(), acceptance=getattr(self.draft, "acceptance", None))
        self.draft_calls += tree.propose_calls
        self.draft_time += time.perf_counter() - t0
        return tree

    def verify_and_accept(self, tree: DraftTree, generator) -> tuple[list[int], int | None, list[int], int]:
        """The target verifies the pending tokens + the tree in one forward and keeps the accepted path; returns
        (path, bonus, pending tokens, cached length before)."""
        t0 = time.perf_counter()
        pending = self.seq[self.tsess.length :]
        m = len(pending)
        logits, feats = self.tsess.verify(pending, tree)
        path, bonus = accept_tree(tree, logits[m - 1], logits[m:], self.cfg, self.total - self.n_gen(), generator)
        c0 = self.tsess.length
        self.tsess.keep(path)
        if self.defer:
            self._keep_features(c0, m, path, feats)
        self.target_time += time.perf_counter() - t0
        return path, bonus, pending, c0

    def _keep_features(self, c0: int, m: int, path: list[int], feats: torch.Tensor) -> None:
        a, rows = len(path), self.feat_rows
        if path == list(range(a)):  # a chain's path: pending and path rows are contiguous
            rows[1 + c0 : 1 + c0 + m + a] = feats[: m + a]
            return
        rows[1 + c0 : 1 + c0 + m] = feats[:m]
        if a:
            idx = torch.tensor([m + j for j in path], dtype=torch.long, device=feats.device)
            rows[1 + c0 + m : 1 + c0 + m + a] = feats.index_select(0, idx)

    def commit(self, tree: DraftTree, path: list[int], bonus: int | None) -> int:
        """Commit the accepted path, the bonus and the forced tokens after them; the draft drops its tree.
        Returns where the round started (tokens generated before it)."""
        start = self.n_gen()
        self.stats.record(tree, path, start)
        for j in path:
            self.commit_token(tree.tokens[j])
        if bonus is not None and self.n_gen() < self.total:
            self.commit_token(bonus)
        self.commit_forced()
        self.session.rollback()
        self.accepted_per_round.append(len(path))
        self.tree_sizes.append(len(tree))
        return start

    def result(self, t_start: float) -> SpecResult:
        tokens = self.seq[self.n_prompt:]
        elapsed = time.perf_counter() - t_start
        rounds, forwards = len(self.accepted_per_round), self.tsess.forwards
        stats = dict(
            rounds=rounds,
            tau=len(tokens) / max(forwards, 1),
            tokens_per_round=len(tokens) / max(rounds, 1),
            mean_accepted=sum(self.accepted_per_round) / max(rounds, 1),
            mean_tree_size=sum(self.tree_sizes) / max(rounds, 1),
            accept_by_depth=self.stats.by_depth,
            accept_by_slot=self.stats.by_slot,
            target_forwards=forwards,
            draft_forwards=self.draft_calls,
            draft_time_s=self.draft_time,
            target_time_s=self.target_time,
            total_time_s=elapsed,
            draft_time_share=self.draft_time / elapsed if elapsed > 0 else 0.0,
        )
        return SpecResult(items=list(self.cons.completed_items), tokens=tokens, target_calls=forwards,
                          draft_calls=self.draft_calls, accepted_per_round=self.accepted_per_round, stats=stats,
                          trace=self.trace)


def speculative_generate(
    target,
    draft: Draft,
    prompt_tokens: Sequence[int],
    trie: ItemTrie,
    cfg: GenerationConfig,
    spec: SpecConfig | None = None,
    generator: torch.Generator | None = None,
    history: Sequence[int] | None = None,
) -> SpecResult:
    """Generate one list (batch 1) with speculative decoding. Same arguments and output as `generate_list`, plus
    the draft and the speculation settings."""
    spec = SpecConfig() if spec is None else spec
    t_start = time.perf_counter()
    prompt = check_prompt(prompt_tokens)
    check_draft(target, draft)
    dec = _ListDecode(target, draft, prompt, trie, cfg, spec, history)
    with torch.inference_mode():
        dec.prefill()
        while dec.n_gen() < dec.total:
            tree = dec.draft_tree()  # 1. draft
            path, bonus, pending, c0 = dec.verify_and_accept(tree, generator)  # 2. verify, 3. accept
            start = dec.commit(tree, path, bonus)  # 4. commit
            if dec.trace is not None:
                dec.trace.append(dict(start=start, pending=pending, cached_before=c0, tree=tree, path=list(path),
                                      bonus=bonus))
    return dec.result(t_start)
