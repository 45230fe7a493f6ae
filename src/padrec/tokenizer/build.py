"""Build a dataset's semantic-ID table: embed item texts, quantise (RQ-KMeans / RQ-VAE) or take the
provided IDs, make every ID unique, and record how it was made."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from padrec import PadrecError
from padrec.data.dataset import Dataset, load_provided_sids
from padrec.tokenizer.collisions import add_disambiguation_level, collision_stats, reassign_last_level
from padrec.tokenizer.rq_kmeans import codebook_usage
from padrec.tokenizer.semantic_ids import SemanticIDs
from padrec.tokenizer.vocab import LAYOUTS, SIDVocab

METHODS = ("rq-kmeans", "rq-vae", "provided")


@dataclass
class TokenizerConfig:
    method: str = "rq-kmeans"  # "rq-kmeans" | "rq-vae" | "provided"
    levels: int = 3  # quantisation levels (a disambiguation level is added on top)
    codebook_size: int = 256
    layout: str = "per_level"  # SIDVocab layout: "per_level" | "shared"
    seed: int = 0
    kmeans_niter: int = 20
    rqvae_epochs: int = 100
    embed_batch_size: int = 128
    show_progress: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise PadrecError(f"unknown tokenizer method {self.method!r}: expected one of {METHODS}")
        if self.layout not in LAYOUTS:
            raise PadrecError(f"unknown vocabulary layout {self.layout!r}: expected one of {LAYOUTS}")
        if self.levels < 1 or self.codebook_size < 1:
            raise PadrecError("tokenizer levels and codebook_size must be >= 1")


def _log(console, msg: str) -> None:
    if console is not None:
        console.print(msg)


def build_semantic_ids(
    dataset: Dataset, cfg: TokenizerConfig | None = None, cache_dir: Path | None = None, console=None
) -> SemanticIDs:
    """The semantic-ID table of the dataset's items under cfg.

    rq-kmeans / rq-vae: `levels` quantised levels + one disambiguation level (TIGER).
    provided: the IDs shipped with the dataset; collisions are moved within the last level.
    cache_dir (optional) caches the item embeddings.
    """
    cfg = cfg or TokenizerConfig()
    if dataset.num_items == 0:
        raise PadrecError(f"dataset {dataset.name!r} has no items to tokenise")
    info: dict = {
        "method": cfg.method,
        "seed": cfg.seed,
        "dataset": dataset.name,
        "num_items": dataset.num_items,
        "config": asdict(cfg),
        "timings_s": {},
    }
    if cfg.method == "provided":
        codes, sizes = _provided_codes(dataset)
        info.update(levels=codes.shape[1], codebook_size=max(sizes), embedding_model=None)
        info["collisions_before"] = collision_stats(codes)
        codes = reassign_last_level(codes, sizes[-1])
        info["collision_fix"] = "reassign_last_level"
    else:
        from padrec.tokenizer.embed import EMBEDDING_MODEL_NAME, embed_texts

        texts = [it.text() for it in dataset.items]
        cache = Path(cache_dir) / f"{dataset.name}.item_emb.npy" if cache_dir is not None else None
        _log(console, f"embedding {len(texts)} item texts with {EMBEDDING_MODEL_NAME}")
        t0 = time.perf_counter()
        emb = embed_texts(texts, batch_size=cfg.embed_batch_size, show_progress=cfg.show_progress, cache_path=cache)
        info["timings_s"]["embed"] = round(time.perf_counter() - t0, 3)
        _log(console, f"quantising with {cfg.method}: {cfg.levels} levels x {cfg.codebook_size} codes")
        t0 = time.perf_counter()
        if cfg.method == "rq-kmeans":
            from padrec.tokenizer.rq_kmeans import rq_kmeans

            codes, books = rq_kmeans(emb, cfg.levels, cfg.codebook_size, seed=cfg.seed, niter=cfg.kmeans_niter)
            sizes = [b.shape[0] for b in books]  # clamped when there are fewer items than codes
        else:
            from padrec.tokenizer.rq_vae import rq_vae

            codes = rq_vae(emb, cfg.levels, cfg.codebook_size, epochs=cfg.rqvae_epochs, seed=cfg.seed,
                           show_progress=cfg.show_progress)
            sizes = [cfg.codebook_size] * cfg.levels
        info["timings_s"]["quantise"] = round(time.perf_counter() - t0, 3)
        info.update(levels=cfg.levels, codebook_size=cfg.codebook_size, embedding_model=EMBEDDING_MODEL_NAME)
        info["collisions_before"] = collision_stats(codes)
        codes = add_disambiguation_level(codes)
        sizes = list(sizes) + [max(1, int(codes[:, -1].max()) + 1)]
        info["collision_fix"] = "disambiguation_level"
    info["collisions_after"] = collision_stats(codes)
    info["codebook_usage"] = codebook_usage(codes, sizes)
    vocab = SIDVocab(tuple(int(s) for s in sizes), cfg.layout)
    sids = SemanticIDs(codes, vocab, info)
    _log(console, f"semantic IDs: {sids.num_items} items, {vocab.levels} codes per item, vocabulary {vocab.size}")
    return sids


def _provided_codes(dataset: Dataset) -> tuple[np.ndarray, list[int]]:
    try:
        raw = load_provided_sids(dataset)
    except (KeyError, OSError, EOFError, ValueError) as e:
        raise PadrecError(f"dataset {dataset.name!r}: provided_sids.json.gz is incomplete or corrupt: {e}") from e
    if raw is None:
        raise PadrecError(f"dataset {dataset.name!r} ships no provided semantic IDs (provided_sids.json.gz)")
    lengths = {len(r) for r in raw}
    if len(lengths) != 1 or 0 in lengths:
        raise PadrecError(f"dataset {dataset.name!r}: provided semantic IDs have unequal lengths {sorted(lengths)}")
    codes = np.asarray(raw, dtype=np.int64)
    if codes.min() < 0:
        raise PadrecError(f"dataset {dataset.name!r}: provided semantic IDs contain negative codes")
    return codes, [int(m) + 1 for m in codes.max(axis=0)]


def format_tokenizer_report(sids: SemanticIDs):
    """A rich Table: per-level codebook usage, then collision stats before and after making IDs unique."""
    from rich.table import Table

    info = sids.info
    title = (f"semantic IDs: {info.get('dataset', '?')} / {info.get('method', '?')} "
             f"({sids.num_items} items, {sids.vocab.levels} tokens + SEP, vocab {sids.vocab.size})")
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    usage = info.get("codebook_usage") or codebook_usage(sids.codes, sids.vocab.codebook_sizes)
    for u in usage:
        table.add_row(f"level {u['level']} codes used", f"{u['used']}/{u['size']} ({100 * u['usage']:.1f}%)")
    for when in ("collisions_before", "collisions_after"):
        st = info.get(when)
        if st:
            table.add_row(
                when.replace("_", " "),
                f"{st['distinct_ids']} distinct IDs, {st['items_sharing_id']} items share one, max group {st['max_group_size']}",
            )
    if info.get("collision_fix"):
        table.add_row("collision fix", str(info["collision_fix"]))
    for k, v in (info.get("timings_s") or {}).items():
        table.add_row(f"time {k}", f"{v:.1f}s")
    return table
