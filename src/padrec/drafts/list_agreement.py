"""A draft's agreement with the target along the target's own greedy lists: the validation that matches inference.

Training validation (`drafts/train.py`) scores the draft on the *next real item* after a user's history. At
inference the draft drafts a whole 10-item list that the target wrote, nine of whose items follow items the
target chose, not the user: text neither the target nor the draft was trained on. Six-step HASS on Games scored
higher than three-step HASS on the first kind of validation and lower in list generation, so the first kind can
rank drafts wrongly. Here the examples are `prompt + the target's greedy list` for a sample of users, with every
generated SID token labelled, and the draft is unrolled `steps` steps over them exactly as in validation (step j
reads its own features for the last j-1 positions): agreement at step j is how often the draft's top-1 equals
the target's at tree depth j of a chain, counted over the list's tokens.
"""

from __future__ import annotations

import random

from padrec import PadrecError
from padrec.training.sequences import IGNORE


def greedy_list_examples(run, target, split: str = "valid", users: int = 200, n_items: int = 10, seed: int = 0,
                         batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per sampled user: the prompt, then the target's greedy constrained list (batched
    decoder); labels on the list's SID tokens, none on its separators (the constraint forces them)."""
    from padrec.decoding.autoregressive import GenerationConfig, generate_list_batch
    from padrec.decoding.trie import ItemTrie

    if users < 1:
        raise PadrecError(f"users must be >= 1, got {users}")
    cases = run.dataset.eval_cases(split, max_history=run.info.max_history)
    if not cases:
        raise PadrecError(f"run {run.path} has no {split} users to generate lists for")
    cases = random.Random(seed).sample(cases, min(users, len(cases)))
    prompts = [run.prompt(c.history) for c in cases]
    trie = ItemTrie(run.sids.all_item_tokens())
    results = generate_list_batch(target, prompts, trie, GenerationConfig(n_items=n_items), batch_size=batch_size)
    L = run.sids.vocab.levels
    examples = []
    for prompt, res in zip(prompts, results):
        ids = prompt + res.tokens
        labels = [IGNORE] * len(prompt) + [t if i % (L + 1) < L else IGNORE for i, t in enumerate(res.tokens)]
        examples.append((ids, labels))
    return examples


def list_agreement(run, names: list[str], users: int = 200, steps: int = 6, split: str = "valid",
                   seed: int = 0, progress: bool = True) -> list[dict]:
    """Per draft of the run: agreement by unrolled step and by SID level (step 1) along the target's greedy lists
    of the same `users` users."""
    from tqdm.auto import tqdm

    from padrec.drafts.registry import load_draft_model
    from padrec.drafts.train import DraftTrainConfig, TargetFeatures, validate

    target = run.load_target()
    target.eval()
    examples = greedy_list_examples(run, target, split, users, seed=seed)
    feats = TargetFeatures(target, examples, cache_mb=4096)
    head = target.get_output_embeddings()
    known = set(DraftTrainConfig.__dataclass_fields__)
    rows = []
    for name in tqdm(names, desc="list agreement", unit="draft", disable=not progress):
        model, meta = load_draft_model(run, name)
        cfg = DraftTrainConfig(**{k: v for k, v in meta["config"].items() if k in known})
        val = validate(meta["kind"], model, head, examples, feats, cfg, run.sids.vocab.levels, steps=steps)
        by_step = val["valid_agreement_by_step"]
        rows.append({"draft": name, "kind": meta["kind"], "users": len(examples),
                     "agreement_by_step": by_step, "mean": sum(by_step) / len(by_step),
                     "agreement_per_level": val["valid_agreement_per_level"],
                     "train_valid_agreement_by_step": meta.get("valid_agreement_by_step")})
    return rows
