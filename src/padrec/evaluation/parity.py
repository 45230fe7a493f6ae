"""Parity of padrec's constrained beam search with the user's own Hugging Face `generate` on an imported model.

For sample users, padrec's top-K (beam search on the renamed model) is set beside `generate(num_beams=K,
num_return_sequences=K, prefix_allowed_tokens_fn=...)` on the checkpoint exactly as it is on disk, prompts in its own
token ids. Where the two lists differ, each item of either list is scored exactly (one full forward per item) under
both conventions, which names the cause:

  padrec  the sum over the item's levels of the log-softmax over the *allowed* tokens (forced steps add 0); the
          end token is forced, not scored (decoding/beam.py);
  hf      `generate` adds the log-softmax over the *whole vocabulary* of every generated token, the end token too,
          then masks (LogitsProcessor after log_softmax).

"convention": each list is the top-K of the union under its own convention, so the lists are each right and differ
only in what they rank by. "search": one of them is not its convention's top-K of the union (beam pruning, or a
score tie within float error).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from padrec import PadrecError
from padrec.decoding.beam import beam_rank_key, beam_search_items_batch
from padrec.decoding.trie import ItemTrie

TIE_ATOL = 1e-4  # scores within this are a float tie (the constrained-beam tolerance of the speculative beam)


@dataclass
class UserParity:
    user: str
    padrec: list[int]
    hf: list[int]
    cause: str  # "same", "same items, other order", "convention", "search"

    @property
    def same(self) -> bool:
        return self.padrec == self.hf


def hf_allowed_fn(trie: ItemTrie, hf_of_dense: Sequence[int], prompt_lens: Sequence[int], end_id: int):
    """A stateless `prefix_allowed_tokens_fn` in the checkpoint's own ids: the trie's children after the tokens
    generated so far, the end token after a whole item."""
    dense_of = {h: d for d, h in enumerate(hf_of_dense)}
    child_hf = [[hf_of_dense[t] for t in toks] for toks in trie.child_tokens]

    def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
        gen = input_ids[prompt_lens[batch_id]:].tolist()
        node = 0
        for tok in gen[: trie.levels]:
            node = trie.child_of[node].get(dense_of.get(tok, -1))
            if node is None:
                return [end_id]
        return child_hf[node] if len(gen) < trie.levels else [end_id]

    return allowed


def hf_beam_lists(model, prompts_hf: list[list[int]], trie: ItemTrie, hf_of_dense, end_id: int, k: int,
                  pad_id: int) -> list[list[int]]:
    """The user's own constrained beam search, one prompt at a time (no padding question), as item ids."""
    dense_of = {h: d for d, h in enumerate(hf_of_dense)}
    out = []
    for p in prompts_hf:
        fn = hf_allowed_fn(trie, hf_of_dense, [len(p)], end_id)
        ids = torch.tensor([p])
        with torch.inference_mode():
            seqs = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=k,
                                  max_new_tokens=trie.levels + 1, do_sample=False, prefix_allowed_tokens_fn=fn,
                                  eos_token_id=end_id, pad_token_id=pad_id, early_stopping=True)
        items = []
        for row in seqs[:, len(p):].tolist():
            item = trie.item_of([dense_of.get(t, -1) for t in row[: trie.levels]])
            items.append(-1 if item is None else item)
        out.append(items)
    return out


def item_scores(model, prompt: list[int], trie: ItemTrie, items: Sequence[int], sep: int) -> dict[int, tuple]:
    """(padrec score, hf score) of each item, exact, from one full forward of prompt + item + end token."""
    out = {}
    with torch.inference_mode():
        for item in items:
            toks = list(trie.item_tokens[item])
            seq = prompt + toks + [sep]
            logp = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].float().log_softmax(-1)
            node, mine, theirs = 0, 0.0, 0.0
            for d, tok in enumerate(toks + [sep]):
                row = logp[len(prompt) - 1 + d]
                theirs += float(row[tok])
                if d < len(toks):
                    allowed = list(trie.child_tokens[node])
                    mine += float(row[tok] - row[allowed].logsumexp(0))
                    node = trie.child_of[node][tok]
            out[item] = (mine, theirs)
    return out


def _cause(padrec: list[int], hf: list[int], scores: dict[int, tuple], trie: ItemTrie) -> str:
    if padrec == hf:
        return "same"
    if sorted(padrec) == sorted(hf):
        return "same items, other order"
    union = [i for i in dict.fromkeys(padrec + hf) if i >= 0]

    def top(which: int) -> list[int]:
        return sorted(union, key=lambda i: beam_rank_key(scores[i][which], trie.item_tokens[i]))[: len(padrec)]

    def near(lst, ref, which):
        return all(i == j or abs(scores[i][which] - scores[j][which]) <= TIE_ATOL for i, j in zip(lst, ref))

    return "convention" if near(padrec, top(0), 0) and near(hf, top(1), 1) else "search"


def parity_report(run, users: int, k: int) -> dict:
    if run.imported is None:
        raise PadrecError(f"run {run.path} has no imported checkpoint: parity compares padrec with the Hugging Face "
                          "generate of a model brought with `padrec import-model`")
    from transformers import AutoModelForCausalLM

    imp = run.imported
    trie = ItemTrie(run.sids.all_item_tokens())
    cases = run.dataset.eval_cases("test", max_history=run.info.max_history)[:users]
    ours = run.load_target()
    prompts = [run.prompt(c.history) for c in cases]
    mine = beam_search_items_batch(ours, prompts, trie, beam_size=k, top_k=k, batch_size=8)
    theirs_model = AutoModelForCausalLM.from_pretrained(imp.manifest.model_dir, local_files_only=True,
                                                        dtype=getattr(torch, imp.manifest.dtype)).eval()
    hf_of_dense = imp.hf_of_dense
    hf_lists = hf_beam_lists(theirs_model, [imp.renderer.hf_ids(c.history) for c in cases], trie, hf_of_dense,
                             hf_of_dense[trie.sep], k, hf_of_dense[0])
    rows = []
    for c, p, m, h in zip(cases, prompts, mine, hf_lists):
        scores = {} if m.items == h else item_scores(ours, p, trie, [i for i in set(m.items + h) if i >= 0],
                                                     trie.sep)
        rows.append(UserParity(str(c.user), m.items, h, _cause(m.items, h, scores, trie)))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.cause] = counts.get(r.cause, 0) + 1
    overlap = sum(len(set(r.padrec) & set(r.hf)) for r in rows) / max(1, len(rows) * k)
    return {"users": len(rows), "k": k, "identical": sum(r.same for r in rows), "causes": counts,
            "mean_overlap": round(overlap, 4), "dtype": imp.manifest.dtype,
            "rows": [r.__dict__ | {"same": r.same} for r in rows]}
