"""Turning item sequences into token sequences for the target LM."""

from __future__ import annotations

import random

import torch

from padrec import PadrecError
from padrec.tokenizer.semantic_ids import SemanticIDs, items_to_tokens
from padrec.tokenizer.vocab import PAD, SEP

IGNORE = -100


def training_windows(sequences, max_items: int) -> list[tuple[tuple[int, ...], int]]:
    """Cut long item sequences into windows of at most `max_items`, so every target item is predicted
    from at most `max_items - 1` previous items (the history length used at inference).

    Returns (window, loss_from) pairs: items before `loss_from` were already targets of an earlier
    window and only serve as context, so each item is a training target exactly once.
    """
    out = []
    for seq in sequences:
        seq = tuple(seq)
        if len(seq) <= max_items:
            out.append((seq, 0))
            continue
        covered = 0  # items [0, covered) already had their loss
        start = 0
        while covered < len(seq):
            start = min(start, len(seq) - max_items)
            end = start + max_items
            out.append((seq[start:end], covered - start))
            covered = end
            start = end - (max_items - 1) + (max_items - 1) // 2  # half-window of fresh context overlap
    return out


def lm_example(items, sids: SemanticIDs, loss_from_item: int = 0) -> tuple[list[int], list[int]]:
    """Input ids and labels (shifted inside the HF loss) for one item window.

    Loss is put on the SID tokens of items >= `loss_from_item`; separators are forced by the constraint at
    inference, so they carry no loss. Windows after the first of a long sequence pass loss_from_item > 0
    so overlapping items are not counted twice.
    """
    ids = items_to_tokens(items, sids)
    labels = [IGNORE] * len(ids)
    L = sids.vocab.levels
    for k in range(loss_from_item, len(items)):
        start = 1 + k * (L + 1)
        labels[start : start + L] = ids[start : start + L]
    return ids, labels


def next_item_example(history, target: int, sids: SemanticIDs) -> tuple[list[int], list[int]]:
    """Loss only on the target item's tokens given the history (validation)."""
    items = list(history) + [target]
    return lm_example(items, sids, loss_from_item=len(history))


def prompt_example(prompt: list[int], item_tokens) -> tuple[list[int], list[int]]:
    """A prompt (an imported model's own template around the history) and the next item's SID tokens + SEP; loss on
    the SID tokens only, as in `lm_example`."""
    ids = list(prompt) + list(item_tokens) + [SEP]
    labels = [IGNORE] * len(prompt) + list(item_tokens) + [IGNORE]
    return ids, labels


def imported_examples(run, sequences) -> list[tuple[list[int], list[int]]]:
    """Every next item of every sequence after the first, from the history before it, in the model's template: what
    an imported model (LC-Rec, MiniOneRec) saw at training, one item per prompt."""
    return [prompt_example(run.prompt(seq[:t]), run.sids.item_tokens(seq[t]))
            for seq in sequences for t in range(1, len(seq))]


def collate(examples: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Right-padded batch (training never uses a KV cache, so right padding is fine)."""
    n = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), n), PAD, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def length_bucketed_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffle, then sort within chunks of 50 batches by length, so batches carry little padding
    but their order stays random."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s : s + chunk], key=lambda i: lengths[i])
        batches.extend(part[b : b + batch_size] for b in range(0, len(part), batch_size))
    rng.shuffle(batches)
    return batches


def run_examples(run, max_valid_cases: int, seed: int):
    """Training examples (each user's training items in windows, loss on SID tokens) and validation examples
    (a sample of validation users: history -> first validation item) of a run; used by every trainer."""
    ds, sids = run.dataset, run.sids
    if run.imported is not None:
        train = imported_examples(run, ds.train_sequences())
        valid = [prompt_example(run.prompt(c.history), sids.item_tokens(t))
                 for c in valid_cases(run, max_valid_cases, seed) for t in c.targets[:1]]
        if not train:
            raise PadrecError(f"dataset {ds.name!r} has no training sequence of two items or more")
        return train, valid
    windows = training_windows(ds.train_sequences(), run.info.max_history + 1)
    if not windows:
        raise PadrecError(f"dataset {ds.name!r} has no training sequences")
    train = [lm_example(w, sids, loss_from_item=lf) for w, lf in windows]
    valid = [next_item_example(c.history, t, sids) for c in valid_cases(run, max_valid_cases, seed)
             for t in c.targets[:1]]
    return train, valid


def valid_cases(run, max_valid_cases: int, seed: int):
    """The seeded sample of validation queries every trainer validates on."""
    cases = run.dataset.eval_cases("valid", max_history=run.info.max_history)
    return random.Random(seed).sample(cases, min(len(cases), max_valid_cases))
