"""The target's own greedy lists, as validation and as training data for drafts.

At inference the draft drafts a whole 10-item list that the target writes: nine of its items follow items the
target chose, not the user. Drafts are trained and validated on real user sequences, which differ from that.

*Validation* (`list_agreement`, `padrec list-agreement`, `train-draft --list-valid-users`). Training validation
(`drafts/train.py`) scores the draft on the next real item after a user's history, and it can rank drafts
wrongly: six-step HASS on Games scored higher than three-step HASS there and lower in list generation. Here the
examples are `prompt + the target's greedy list` for a sample of validation users, with every generated SID token
labelled, and the draft is unrolled `steps` steps over them exactly as in validation (step j reads its own
features for the last j-1 positions): agreement at step j is how often the draft's top-1 equals the target's at
tree depth j of a chain, over the list's tokens.

*Training data* (`train_list_examples`, `train-draft --list-train-users`): the same kind of example for prompts
cut from training sequences (a strict prefix of a user's training items, so never a validation or test prompt),
added to the training windows so the draft also learns the text it will draft at inference. Generated once per
target and cached under the run.
"""

from __future__ import annotations

import json
import random

from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.decoding.autoregressive import GenerationConfig, generate_list_batch
from padrec.decoding.trie import ItemTrie
from padrec.drafts.objective import TargetFeatures, validate
from padrec.drafts.registry import load_draft_model, target_identity
from padrec.drafts.train_config import DraftTrainConfig
from padrec.files import atomic_write_text
from padrec.training.sequences import IGNORE


def greedy_list_examples(run, target, split: str = "valid", users: int = 200, n_items: int = 10, seed: int = 0,
                         batch_size: int = 64) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per sampled user of `split`: the prompt, then the target's greedy constrained list;
    labels on the list's SID tokens, none on its separators (the constraint forces them)."""
    if users < 1:
        raise PadrecError(f"users must be >= 1, got {users}")
    cases = run.dataset.eval_cases(split, max_history=run.info.max_history)
    if not cases:
        raise PadrecError(f"run {run.path} has no {split} users to generate lists for")
    cases = random.Random(seed).sample(cases, min(users, len(cases)))
    return _list_examples(run, target, [run.prompt(c.history) for c in cases], n_items, batch_size)


def train_list_examples(run, target, users: int, n_items: int = 10, seed: int = 0, batch_size: int = 64,
                        progress: bool = True) -> list[tuple[list[int], list[int]]]:
    """Examples like `greedy_list_examples` for `users` training users, each prompted with a random strict prefix
    of its training items. Cached per target in RUN/target_lists/ (generating costs ~0.04 s per list on a 2-core
    CPU for the small target)."""
    if users < 1:
        raise PadrecError(f"users must be >= 1, got {users}")
    cache = (run.path / "target_lists" /
             f"train_{users}_items{n_items}_seed{seed}_{target_identity(run)['target_hash']}.json")
    if cache.is_file():
        try:
            return [(ids, labels) for ids, labels in json.loads(cache.read_text())]
        except ValueError:  # bad JSON or a malformed entry
            pass  # a corrupt cache is regenerated, not trusted
    rng = random.Random(seed)
    seqs = [s for s in run.dataset.train_sequences() if len(s) >= 2]
    if not seqs:
        raise PadrecError(f"run {run.path} has no training sequence of 2+ items to cut a prompt from")
    picked = rng.sample(seqs, min(users, len(seqs)))
    prompts = [run.prompt(s[: rng.randrange(1, len(s))]) for s in picked]
    examples = []
    with tqdm(total=len(prompts), desc="target lists for training", unit="list", disable=not progress) as bar:
        for start in range(0, len(prompts), 1024):
            chunk = prompts[start : start + 1024]
            examples += _list_examples(run, target, chunk, n_items, batch_size)
            bar.update(len(chunk))
    atomic_write_text(cache, json.dumps(examples))
    return examples


def _list_examples(run, target, prompts, n_items: int, batch_size: int) -> list[tuple[list[int], list[int]]]:
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
                     "train_valid_agreement_by_step": meta.get("valid_agreement_by_step"),
                     "train_valid_score": meta.get("valid_score")})
    return rows
