import math

import pytest

from padrec.metrics import ndcg_at_k, ranking_metrics, recall_at_k


def test_single_target_hand_computed():
    ranked = [7, 3, 9, 1, 4]
    assert recall_at_k(ranked, [9], 2) == 0.0
    assert recall_at_k(ranked, [9], 3) == 1.0
    # hit at rank 3 (index 2): 1/log2(4) = 0.5, ideal = 1
    assert ndcg_at_k(ranked, [9], 5) == pytest.approx(0.5)
    assert ndcg_at_k(ranked, [42], 5) == 0.0


def test_multi_target_hand_computed():
    ranked = [1, 2, 3, 4, 5, 6]
    targets = [2, 5, 99]
    assert recall_at_k(ranked, targets, 5) == pytest.approx(2 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, targets, 5) == pytest.approx(dcg / idcg)
    # with k = 2 the ideal list has only 2 slots
    assert ndcg_at_k(ranked, targets, 2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_duplicate_targets_count_once_and_mean_over_users():
    m = ranking_metrics([[1, 2], [3, 4]], [[1, 1], [9]], ks=(1,))
    assert m["recall@1"] == pytest.approx(0.5)
    assert m["ndcg@1"] == pytest.approx(0.5)


def test_perfect_ranking_scores_one():
    m = ranking_metrics([[5, 6, 7]], [[6, 5]], ks=(2, 5))
    assert m["recall@2"] == 1.0 and m["ndcg@2"] == pytest.approx(1.0)


def test_errors():
    with pytest.raises(ValueError):
        recall_at_k([1], [], 1)
    with pytest.raises(ValueError):
        ranking_metrics([[1]], [[1], [2]])
