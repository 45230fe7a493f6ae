"""Residual k-means (RQ-KMeans): quantise vectors level by level, each level clustering the previous residual."""

from __future__ import annotations

import numpy as np

from padrec import PadrecError


def kmeans(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """faiss k-means on x [n, d]: (centroids [k', d] float32, assignment [n] int64), k' = min(k, n).

    Runs single-threaded so that a seed always gives the same result.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n == 0:
        raise PadrecError("cannot cluster an empty set of vectors")
    k = max(1, min(int(k), n))
    if k == 1:
        cent = x.mean(axis=0, keepdims=True)
        return cent.astype(np.float32), np.zeros(n, dtype=np.int64)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        km = faiss.Kmeans(d, k, niter=niter, seed=seed, verbose=False, min_points_per_centroid=1)
        km.train(x)
        _, assign = km.index.search(x, 1)
        cent = np.array(km.centroids, dtype=np.float32).reshape(k, d)
    finally:
        faiss.omp_set_num_threads(threads)
    return cent, assign[:, 0].astype(np.int64)


def rq_kmeans(
    x: np.ndarray, levels: int = 3, codebook_size: int = 256, seed: int = 0, niter: int = 20
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Residual k-means: (codes [n, levels] int64, codebooks: one [C_l, d] float32 array per level).

    C_l = min(codebook_size, n): with fewer points than codes a level gets one cluster per point.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise PadrecError(f"rq_kmeans expects a [n, d] matrix, got shape {x.shape}")
    if levels < 1 or codebook_size < 1:
        raise PadrecError("rq_kmeans needs levels >= 1 and codebook_size >= 1")
    residual = x.copy()
    codes = np.zeros((x.shape[0], levels), dtype=np.int64)
    codebooks: list[np.ndarray] = []
    for level in range(levels):
        cent, assign = kmeans(residual, codebook_size, seed=seed + level, niter=niter)
        codes[:, level] = assign
        codebooks.append(cent)
        residual = residual - cent[assign]
    return codes, codebooks


def codebook_usage(codes: np.ndarray, codebook_sizes) -> list[dict]:
    """Per level: distinct codes used, codebook size, and their ratio."""
    codes = np.asarray(codes)
    out = []
    for level, size in enumerate(codebook_sizes):
        used = int(np.unique(codes[:, level]).size) if codes.shape[0] else 0
        out.append({"level": level, "used": used, "size": int(size), "usage": used / int(size) if size else 0.0})
    return out
