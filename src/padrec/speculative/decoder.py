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
from padrec.decoding.autoregressive import GenerationConfig, _check_prompt, make_constraint
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


def _check_draft(target, draft: Draft) -> None:
    head = target.get_output_embeddings()
    v_target = int(head.weight.shape[0]) if head is not None and hasattr(head, "weight") else target.config.vocab_size
    if draft.vocab_size != v_target:
        raise PadrecError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({v_target})")


def _hidden_size(target) -> int:
    head = target.get_output_embeddings()
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[1])
    return int(target.config.hidden_size)


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
    prompt = _check_prompt(prompt_tokens)
    _check_draft(target, draft)
    cons = make_constraint(trie, prompt, cfg, history)
    L = trie.levels
    total = cfg.n_items * (L + 1)
    depth_cap = spec.tree.depth
    defer = bool(draft.uses_target_features)

    seq = list(prompt)  # prompt + generated tokens (all committed)
    n_prompt = len(seq)
    tsess = TargetSession(target)
    session = draft.new_session()
    # defer only: row i + 1 = the target's hidden state at cached position i, row 0 = zeros, so the features of
    # tokens a..b-1 (each paired with the state before it) are the slice [a:b], with no per-round stacking
    feat_rows = None
    if defer:
        feat_rows = torch.empty(n_prompt + total + 1, _hidden_size(target), dtype=tsess.dtype, device=tsess.device)
        feat_rows[0] = 0.0
    draft_n = 0  # committed tokens the draft has
    draft_calls = 0
    draft_time = 0.0
    target_time = 0.0
    accepted_per_round: list[int] = []
    by_depth = [[0, 0] for _ in range(depth_cap)]  # [attempts, accepts] per draft depth 1..D
    by_slot = [[0, 0] for _ in range(L + 1)]  # per within-item slot 0..L-1, L = SEP
    tree_sizes: list[int] = []
    trace: list[dict] | None = [] if spec.trace else None

    def n_gen() -> int:
        return len(seq) - n_prompt

    def commit_token(tok: int) -> None:
        cons.advance(tok)
        seq.append(tok)

    def commit_forced() -> None:
        while n_gen() < total:
            toks, _ = cons.allowed_with_tensor()
            if len(toks) != 1:
                return
            commit_token(toks[0])

    with torch.inference_mode():
        if defer and len(prompt) > 1:
            t0 = time.perf_counter()
            _, feats = tsess.prefill(prompt[:-1])
            target_time += time.perf_counter() - t0
            feat_rows[1 : 1 + len(feats)] = feats
        commit_forced()
        while n_gen() < total:
            # 1. the draft catches up and builds its tree
            t0 = time.perf_counter()
            upto = min(len(seq), tsess.length + 1) if defer else len(seq)
            new = seq[draft_n:upto]
            if new:
                droot = session.commit(new, feat_rows[draft_n:upto] if defer else None)
                draft_calls += 1
                draft_n = upto
            chain = seq[draft_n:]
            offset = len(chain)
            # committed tokens whose features are not known yet: a speculative chain for the draft, one node per
            # call (a feature-level draft needs the parent's predicted feature before it can run a node)
            for j, tok in enumerate(chain):
                droot = session.propose([j - 1], [tok], [j + 1])[-1]
                draft_calls += 1

            def propose(parents, tokens, depths, _o=offset):  # tree-local indices -> the session's (after the chain)
                parents = [p + _o if p >= 0 else _o - 1 for p in parents]
                return session.propose(parents, tokens, [d + _o for d in depths])

            remaining = total - n_gen()
            tree: DraftTree = build_tree(droot, cons, cfg, spec.tree, propose, max_depth=remaining,
                                         acceptance=getattr(draft, "acceptance", None))
            draft_calls += tree.propose_calls
            draft_time += time.perf_counter() - t0

            # 2. verify
            t0 = time.perf_counter()
            pending = seq[tsess.length :]
            m = len(pending)
            logits, feats = tsess.verify(pending, tree)
            # 3. accept
            root_logits = logits[m - 1]
            path, bonus = accept_tree(tree, root_logits, logits[m:], cfg, remaining, generator)
            # 4. commit
            c0 = tsess.length
            tsess.keep(path)
            if defer:
                a = len(path)
                if path == list(range(a)):  # a chain's path: pending and path rows are contiguous
                    feat_rows[1 + c0 : 1 + c0 + m + a] = feats[: m + a]
                else:
                    feat_rows[1 + c0 : 1 + c0 + m] = feats[:m]
                    if a:
                        idx = torch.tensor([m + j for j in path], dtype=torch.long, device=feats.device)
                        feat_rows[1 + c0 + m : 1 + c0 + m + a] = feats.index_select(0, idx)
            target_time += time.perf_counter() - t0

            start = n_gen()
            node, reached = -1, 0
            for d in range(1, tree.max_depth + 1):  # acceptance stats: a depth is attempted when the walk got
                if not tree.children.get(node):  # to its parent and the parent has children in the tree
                    break
                slot = (start + d - 1) % (L + 1)
                by_depth[d - 1][0] += 1
                by_slot[slot][0] += 1
                if len(path) >= d:
                    by_depth[d - 1][1] += 1
                    by_slot[slot][1] += 1
                    node = path[d - 1]
                    reached = d
                else:
                    break
            assert reached == len(path)
            for j in path:
                commit_token(tree.tokens[j])
            if bonus is not None and n_gen() < total:
                commit_token(bonus)
            commit_forced()
            session.rollback()
            accepted_per_round.append(len(path))
            tree_sizes.append(len(tree))
            if trace is not None:
                trace.append(
                    dict(start=start, pending=pending, cached_before=c0, tree=tree, path=list(path), bonus=bonus)
                )

    tokens = seq[n_prompt:]
    elapsed = time.perf_counter() - t_start
    rounds = len(accepted_per_round)
    stats = dict(
        rounds=rounds,
        tau=len(tokens) / max(tsess.forwards, 1),
        tokens_per_round=len(tokens) / max(rounds, 1),
        mean_accepted=sum(accepted_per_round) / max(rounds, 1),
        mean_tree_size=sum(tree_sizes) / max(rounds, 1),
        accept_by_depth=by_depth,
        accept_by_slot=by_slot,
        target_forwards=tsess.forwards,
        draft_forwards=draft_calls,
        draft_time_s=draft_time,
        target_time_s=target_time,
        total_time_s=elapsed,
        draft_time_share=draft_time / elapsed if elapsed > 0 else 0.0,
    )
    return SpecResult(
        items=list(cons.completed_items),
        tokens=tokens,
        target_calls=tsess.forwards,
        draft_calls=draft_calls,
        accepted_per_round=accepted_per_round,
        stats=stats,
        trace=trace,
    )
