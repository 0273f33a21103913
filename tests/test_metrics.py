"""Metrics against direct float64 implementations of their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nlnet import metrics


def _topk_reference(scores: np.ndarray, targets: np.ndarray, k: int) -> float:
    hits = 0
    for s, t in zip(scores, targets):
        # the target is in the top k iff fewer than k classes score strictly higher
        hits += int((s > s[t]).sum() < k)
    return 100.0 * hits / len(targets)


def test_topk_accuracy_matches_reference(rng: torch.Generator) -> None:
    scores = torch.randn(200, 17, generator=rng, dtype=torch.float64)
    targets = torch.randint(0, 17, (200,), generator=rng)
    acc = metrics.topk_accuracy(scores, targets, (1, 5))
    for k in (1, 5):
        assert acc[k] == pytest.approx(_topk_reference(scores.numpy(), targets.numpy(), k))
    assert 0 < acc[1] < acc[5] < 100


def test_topk_hand_example() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5]])
    targets = torch.tensor([1, 2, 0])
    acc = metrics.topk_accuracy(scores, targets, (1, 2))
    assert acc[1] == pytest.approx(100 / 3)
    assert acc[2] == pytest.approx(200 / 3)


def test_topk_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected scores"):
        metrics.topk_accuracy(torch.zeros(3, 4), torch.zeros(4, dtype=torch.long))


def _charades_ap_reference(conf: np.ndarray, labels: np.ndarray) -> float:
    """Line-by-line port of THUMOSeventclspr in Charades_v1_classify.m."""
    order = sorted(range(len(conf)), key=lambda i: -conf[i])  # stable, like MATLAB sort
    tp = [labels[i] == 1 for i in order]
    npos = sum(labels == 1)
    ap, cum_tp, cum_fp = 0.0, 0, 0
    for is_tp in tp:
        cum_tp += is_tp
        cum_fp += not is_tp
        if is_tp:
            ap += cum_tp / (cum_tp + cum_fp)
    return ap / npos


def test_map_matches_official_definition_on_random_scores() -> None:
    g = np.random.default_rng(0)
    n, c = 60, 9
    scores = g.normal(size=(n, c))
    scores[:10, 2] = 0.5  # ties: ranked in input order
    labels = (g.random((n, c)) < 0.25).astype(np.int64)
    labels[:, 4] = 0  # a class without positives is excluded from the mean
    ap = metrics.average_precision_per_class(scores, labels)
    ref = [_charades_ap_reference(scores[:, j], labels[:, j]) for j in range(c) if j != 4]
    assert np.isnan(ap[4])
    np.testing.assert_allclose(np.delete(ap, 4), ref, rtol=1e-12)
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(100 * np.mean(ref))


def test_map_hand_example() -> None:
    # ranking: v0 (pos), v2 (neg), v1 (pos) -> precisions 1 and 2/3 at the positives
    scores = np.array([[0.9], [0.1], [0.5]])
    labels = np.array([[1], [1], [0]])
    assert metrics.mean_average_precision(scores, labels) == pytest.approx(100 * (1 + 2 / 3) / 2)
