"""The checkpoint's SID tokens as a padrec vocabulary, and the permutation between its token ids and padrec's.

The item index maps each item to its SID token strings (`{"12": ["<a_3>", "<b_7>", "<c_0>"]}`). Every string must be
one token of the tokenizer. Levels whose token sets are disjoint give the per-level layout (a token reveals its
level, as in LC-Rec and MiniOneRec); levels that share tokens give the shared layout. A level's codes are its tokens
in the tokenizer's id order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from padrec import PadrecError
from padrec.tokenizer.vocab import NUM_SPECIAL, SIDVocab


@dataclass
class VocabMap:
    vocab: SIDVocab
    codes: np.ndarray  # [num_items, L], row i = dense item i
    hf_of_dense: list[int]  # dense id -> the checkpoint's token id; a permutation of range(model rows)
    report: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.hf_of_dense)

    def dense_of_hf(self) -> np.ndarray:
        return invert(self.hf_of_dense)


def invert(hf_of_dense: list[int]) -> np.ndarray:
    """checkpoint token id -> dense id."""
    inv = np.empty(len(hf_of_dense), dtype=np.int64)
    inv[np.asarray(hf_of_dense, dtype=np.int64)] = np.arange(len(hf_of_dense))
    return inv


def single_token_id(tokenizer, text: str, what: str) -> int:
    """The id of `text` when the tokenizer has it as exactly one token; else a PadrecError that says how to fix it."""
    tid = tokenizer.convert_tokens_to_ids(text)
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tid is None or tid == tokenizer.unk_token_id or ids != [tid]:
        raise PadrecError(f"{what} {text!r} is not one token of the tokenizer (it encodes to {ids}); add the SID "
                          "strings as tokens (tokenizer.add_tokens([...]) and model.resize_token_embeddings) as the "
                          "model was trained with them")
    return int(tid)


def match_items(index: dict, raw_ids: list[str]) -> tuple[list[list[str]], dict]:
    """The index's token strings for each dataset item (dense order); keys are raw item ids or dense ids."""
    if not isinstance(index, dict) or not index:
        raise PadrecError("the item index must be a non-empty JSON object {item id: [SID token strings]}")
    keys = {str(k): v for k, v in index.items()}
    by_raw = sum(1 for r in raw_ids if str(r) in keys)
    by_dense = sum(1 for i in range(len(raw_ids)) if str(i) in keys)
    use_raw = by_raw >= by_dense
    key_of = [str(r) if use_raw else str(i) for i, r in enumerate(raw_ids)]
    missing = [raw_ids[i] for i, k in enumerate(key_of) if k not in keys]
    if missing:
        raise PadrecError(f"{len(missing)} of the dataset's {len(raw_ids)} items are not in the item index "
                          f"(e.g. {missing[:5]}): an item without a SID can be neither written in a prompt nor "
                          "recommended. Import the dataset the model was trained on, or give every item a SID")
    tokens = []
    for k in key_of:
        v = keys[k]
        if isinstance(v, str) or not all(isinstance(t, str) for t in v):
            raise PadrecError(f"item {k!r} of the index must map to a list of SID token strings, got {v!r}")
        tokens.append(list(v))
    dropped = len(keys) - len(raw_ids)
    return tokens, {"index_items": len(keys), "matched_by": "raw_id" if use_raw else "dense id",
                    "index_items_not_in_dataset": dropped}


def _layout(level_ids: list[list[int]]) -> str:
    sets = [set(ids) for ids in level_ids]
    overlap = any(sets[a] & sets[b] for a in range(len(sets)) for b in range(a + 1, len(sets)))
    return "shared" if overlap else "per_level"


def _check_collisions(item_ids: list[tuple[int, ...]], item_strings: list[list[str]]) -> None:
    seen: dict[tuple[int, ...], int] = {}
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(item_ids):
        if t in seen:
            groups.setdefault(t, [seen[t]]).append(i)
        else:
            seen[t] = i
    if groups:
        t, members = next(iter(groups.items()))
        n = sum(len(m) for m in groups.values())
        raise PadrecError(f"{n} items share {len(groups)} SIDs (e.g. items {members} all have "
                          f"{''.join(item_strings[members[0]])}); a constrained decoder cannot tell them apart. "
                          "Deduplicate the index with one more level, as LC-Rec and MiniOneRec do")


def _specials(tokenizer, sep: int, sid_ids: set[int], rows: int) -> list[int]:
    """pad, bos, eos: the tokenizer's own where it has distinct ones, else the lowest ids nothing else uses (padrec
    never decodes them: they only name rows)."""
    taken = {sep} | sid_ids
    out = []
    for tid in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if tid is None or tid in taken or not 0 <= tid < rows:
            tid = next(i for i in range(rows) if i not in taken)
        taken.add(tid)
        out.append(int(tid))
    return out


def build_vocab_map(tokenizer, model_rows: int, item_strings: list[list[str]], item_end: str) -> VocabMap:
    levels = len(item_strings[0])
    if levels < 1 or any(len(s) != levels for s in item_strings):
        lengths = sorted({len(s) for s in item_strings})
        raise PadrecError(f"every item needs the same number of SID tokens; the index has lengths {lengths}")
    if len(tokenizer) > model_rows:
        raise PadrecError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {model_rows} "
                          "rows: resize the model's embeddings to the tokenizer (model.resize_token_embeddings)")
    cache: dict[str, int] = {}
    item_ids = []
    for strings in item_strings:
        for s in strings:
            if s not in cache:
                cache[s] = single_token_id(tokenizer, s, "SID token")
        item_ids.append(tuple(cache[s] for s in strings))
    _check_collisions(item_ids, item_strings)
    sep = single_token_id(tokenizer, item_end, "item_end")
    level_ids = [sorted({t[level] for t in item_ids}) for level in range(levels)]
    sid_ids = set().union(*map(set, level_ids))
    if sep in sid_ids:
        raise PadrecError(f"item_end {item_end!r} is also a SID token")
    layout = _layout(level_ids)
    if layout == "shared":
        pool = sorted(sid_ids)
        level_ids = [pool] * levels
    vocab = SIDVocab(tuple(len(ids) for ids in level_ids), layout)
    code_of = [{tid: c for c, tid in enumerate(ids)} for ids in level_ids]
    codes = np.array([[code_of[lv][t[lv]] for lv in range(levels)] for t in item_ids], dtype=np.int64)
    sid_dense = [level_ids[lv][c] for lv in range(levels) for c in range(vocab.codebook_sizes[lv])]
    if layout == "shared":
        sid_dense = level_ids[0]
    head = _specials(tokenizer, sep, sid_ids, model_rows) + [sep] + sid_dense
    assert len(head) == NUM_SPECIAL + len(sid_dense) == vocab.size
    used = set(head)
    hf_of_dense = head + [i for i in range(model_rows) if i not in used]
    report = {"levels": levels, "layout": layout, "codebook_sizes": list(vocab.codebook_sizes),
              "sid_tokens": len(sid_dense), "item_end_id": sep, "model_rows": model_rows,
              "tokenizer_size": len(tokenizer), "padded_rows": model_rows - len(tokenizer)}
    return VocabMap(vocab, codes, hf_of_dense, report)
