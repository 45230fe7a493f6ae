"""Ranking the evaluation users of a run with each decoding mode, and scoring the rankings."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from padrec import PadrecError
from padrec.data.dataset import EvalCase
from padrec.decoding.autoregressive import GenerationConfig, generate_list_batch
from padrec.decoding.beam import beam_search_items_batch
from padrec.decoding.trie import ItemTrie
from padrec.metrics import KS, ranking_metrics
from padrec.run import Run
from padrec.training import distributed as dist

MODES = ("beam", "list")


@dataclass
class RankConfig:
    """How a ranked list is produced. beam: top-`beam_size` next items by beam search over one item's
    tokens; list: `n_items` items generated one after another (greedy unless `do_sample`)."""

    mode: str = "beam"
    beam_size: int = 20
    n_items: int = 10
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    exclude_history: bool = False
    batch_size: int = 64

    def __post_init__(self):
        if self.mode not in MODES:
            raise PadrecError(f"unknown mode {self.mode!r}: expected one of {MODES}")

    @property
    def list_length(self) -> int:
        return self.beam_size if self.mode == "beam" else self.n_items

    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(
            n_items=self.n_items, do_sample=self.do_sample, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, exclude_history=self.exclude_history,
        )


def rank_histories(model, run: Run, trie: ItemTrie, histories: list[tuple[int, ...]], cfg: RankConfig,
                   progress: bool = True, desc: str | None = None, seed: int = 0) -> list[list[int]]:
    """Ranked item lists (dense ids) for each history, in chunks so the progress bar moves."""
    if cfg.list_length > trie.num_items:
        raise PadrecError(f"asked for {cfg.list_length} items but the catalogue has only {trie.num_items}")
    prompts = [run.prompt(h) for h in histories]
    generator = torch.Generator().manual_seed(seed) if cfg.do_sample else None
    chunk = _chunk_size(cfg)
    out: list[list[int]] = []
    bar = tqdm(total=len(prompts), desc=desc or f"{cfg.mode} decoding", unit="user", disable=not progress)
    for s in range(0, len(prompts), chunk):
        p, h = prompts[s : s + chunk], histories[s : s + chunk]
        if cfg.mode == "beam":
            excl = [list(x) for x in h] if cfg.exclude_history else None
            res = beam_search_items_batch(model, p, trie, cfg.beam_size, cfg.beam_size, cfg.batch_size, excl)
        else:
            res = generate_list_batch(model, p, trie, cfg.generation_config(), [list(x) for x in h],
                                      cfg.batch_size, generator)
        out.extend(r.items for r in res)
        bar.update(len(p))
    bar.close()
    return out


def _chunk_size(cfg: RankConfig) -> int:
    """Users per chunk of `rank_histories`; the decoders sort each chunk by prompt length and then batch it."""
    return cfg.batch_size * 4


def rank_histories_sharded(model, run: Run, trie: ItemTrie, histories: list[tuple[int, ...]], cfg: RankConfig,
                           progress: bool = True, desc: str | None = None, seed: int = 0) -> list[list[int]]:
    """`rank_histories` with the users spread over the ranks of a torchrun group; every rank gets the full
    result, in input order. Without a group it is `rank_histories`.

    Users are dealt out in whole chunks of `rank_histories`, round robin, so every decoder batch holds the same
    users, padded the same way, as in a 1-process run: greedy and beam lists equal the 1-process lists.
    Sampled lists do not: each rank draws from its own generator (seed + rank).
    """
    world = dist.world_size()
    if world == 1:
        return rank_histories(model, run, trie, histories, cfg, progress, desc, seed)
    step = _chunk_size(cfg)
    starts = list(range(0, len(histories), step))[dist.rank() :: world]
    mine = [h for s in starts for h in histories[s : s + step]]
    ranked = rank_histories(model, run, trie, mine, cfg, progress and dist.is_main(), desc, seed + dist.rank())
    out: list[list[int] | None] = [None] * len(histories)
    for their_starts, their_ranked in dist.all_gather_objects((starts, ranked)):
        pos = 0
        for s in their_starts:
            n = min(step, len(histories) - s)
            out[s : s + n] = their_ranked[pos : pos + n]
            pos += n
    return out  # type: ignore[return-value]


def evaluate_cases(model, run: Run, cases: list[EvalCase], cfg: RankConfig, progress: bool = True) -> dict:
    trie = ItemTrie(run.sids.all_item_tokens())
    t0 = time.time()
    with torch.inference_mode():
        rankings = rank_histories_sharded(model, run, trie, [c.history for c in cases], cfg, progress)
    seconds = time.time() - t0
    ks = tuple(k for k in KS if k <= cfg.list_length)
    metrics = ranking_metrics(rankings, [c.targets for c in cases], ks)
    return {
        "mode": cfg.mode,
        "config": asdict(cfg),
        "users": len(cases),
        "seconds": seconds,
        "ms_per_user": 1000 * seconds / max(1, len(cases)),
        **metrics,
    }
