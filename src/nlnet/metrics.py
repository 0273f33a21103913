"""Evaluation metrics: top-k accuracy (Kinetics, paper Tables 2–3) and Charades mAP (Table 4).

``mean_average_precision`` follows Charades' official ``Charades_v1_classify.m``: for each class,
videos are ranked by score (descending; ties keep their input order, as MATLAB's stable
``sort``), AP is the sum of the precision at the rank of every positive divided by the number
of positives, and mAP is the mean over classes; classes without a positive video are excluded.
"""

from __future__ import annotations

import numpy as np
import torch


def topk_correct(
    scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, torch.Tensor]:
    """Per-sample booleans: is the target among the k highest scores? ``scores`` (N, C),
    ``targets`` (N,) int. k larger than C counts every sample as correct."""
    if scores.dim() != 2 or targets.dim() != 1 or scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected scores (N, C) and targets (N,), got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    maxk = min(max(ks), scores.shape[1])
    top = scores.topk(maxk, dim=1).indices
    hit = top == targets[:, None]
    return {k: hit[:, : min(k, maxk)].any(dim=1) for k in ks}


def topk_accuracy(
    scores: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """Top-k accuracy in percent."""
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    return {
        k: 100.0 * v.double().mean().item() for k, v in topk_correct(scores, targets, ks).items()
    }


def average_precision_per_class(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of each class (NaN for classes with no positive), as ``Charades_v1_classify.m``.

    ``scores`` (N videos, C classes) float; ``labels`` (N, C) in {0, 1}.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 2:
        raise ValueError(
            f"expected scores and labels of the same (N, C) shape, got {scores.shape} and {labels.shape}"
        )
    order = np.argsort(-scores, axis=0, kind="stable")
    tp = np.take_along_axis(labels == 1, order, axis=0)
    npos = tp.sum(axis=0)
    precision = np.cumsum(tp, axis=0) / np.arange(1, scores.shape[0] + 1)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * tp).sum(axis=0) / npos
    ap[npos == 0] = np.nan
    return ap


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Charades mAP in percent: mean over classes that have at least one positive video."""
    ap = average_precision_per_class(scores, labels)
    valid = ~np.isnan(ap)
    if not valid.any():
        return float("nan")
    return 100.0 * float(ap[valid].mean())
