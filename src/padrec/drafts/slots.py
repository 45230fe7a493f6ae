"""Within-item slots of tokens: SID level 0..L-1, the separator (L), anything else (L+1: BOS, padding).

The slot of a token is read from the sequence, never from the token id alone: with a shared code vocabulary
(`<12>` at any level) the id does not reveal the level. What decides it is the *run length*: how many SID
tokens end at this position without a separator or special token in between. Training computes the run
lengths of whole sequences at once (`slots_of`); a decoding session carries the run length of each node and
extends it one token at a time (`next_run`, `slot_of`). Both give the same slots for the same positions.

SID tokens are the ids from NUM_SPECIAL up to `sid_end` (None: every id above the specials, as in a padrec-trained
vocabulary). An imported model's text tokens come after its SID tokens in the dense numbering, so `sid_end` keeps
them out of the runs: a token's slot is then its depth in the item path, whatever its string.
"""

from __future__ import annotations

import torch

from padrec.tokenizer.vocab import NUM_SPECIAL, SEP


def is_sid(token: int, sid_end: int | None = None) -> bool:
    return token >= NUM_SPECIAL and (sid_end is None or token < sid_end)


def next_run(prev_run: int, token: int, sid_end: int | None = None) -> int:
    """Run length at `token` given the run length at the token before it (0 before the first token)."""
    return prev_run + 1 if is_sid(token, sid_end) else 0


def slot_of(run: int, token: int, levels: int) -> int:
    if run > 0:
        return run - 1 if run <= levels else levels + 1  # an over-long run is not a valid item: "other"
    return levels if token == SEP else levels + 1


def slots_of(ids: torch.Tensor, levels: int, sid_end: int | None = None) -> torch.Tensor:
    """[B, T] token ids -> [B, T] slots (long)."""
    T = ids.shape[-1]
    is_sid = ids >= NUM_SPECIAL
    if sid_end is not None:
        is_sid = is_sid & (ids < sid_end)
    pos = torch.arange(T, device=ids.device).expand_as(ids)
    # index of the last non-SID token at or before each position (-1 if none): the run starts after it
    last_break = torch.where(is_sid, torch.full_like(pos, -1), pos).cummax(dim=-1).values
    run = torch.where(is_sid, pos - last_break, torch.zeros_like(pos))
    other = torch.full_like(ids, levels + 1)
    slots = torch.where(ids == SEP, torch.full_like(ids, levels), other)
    return torch.where(is_sid & (run <= levels), run - 1, slots)
