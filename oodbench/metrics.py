"""Detection metrics. One convention: positives are the trustworthy inputs, scored higher.

``pos`` holds the scores of trustworthy inputs (in-distribution, clean, correctly
classified), ``neg`` those of the failure source. A perfect detector has AUROC 1.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import mannwhitneyu
from sklearn.metrics import average_precision_score, roc_auc_score

METRICS = ("auroc", "aupr_in", "aupr_out", "fpr_at_95tpr", "detection_error", "mannwhitney_p")


def _labels_scores(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    return y, np.concatenate([pos, neg]).astype(np.float64)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve; ties count one half (the Mann-Whitney convention)."""
    return float(roc_auc_score(*_labels_scores(pos, neg)))


def aupr_in(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with the trustworthy inputs as the positive class (ODIN's AUPR-In)."""
    return float(average_precision_score(*_labels_scores(pos, neg)))


def aupr_out(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with the failures as the positive class and scores negated (AUPR-Out)."""
    y, s = _labels_scores(pos, neg)
    return float(average_precision_score(1 - y, -s))


def roc_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score used as threshold, from (0, 0) up: scikit-learn's
    ``roc_curve(drop_intermediate=False)`` to the last bit, without its input validation, which
    cost more than the curve itself in tuning loops (ODIN computes 210 per failure source).
    """
    scores = np.concatenate([pos, neg]).astype(np.float64)
    positive = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positive = scores[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    true_positives = np.cumsum(positive)[ends]
    false_positives = 1 + ends - true_positives
    return (np.r_[0, false_positives] / false_positives[-1], np.r_[0, true_positives] / true_positives[-1])


def fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    """FPR at the highest threshold whose TPR reaches ``tpr`` (no interpolation)."""
    fprs, tprs = roc_points(pos, neg)
    return float(fprs[np.searchsorted(tprs, tpr - 1e-12, side="left")])


def detection_error(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    """ODIN's P_e = 0.5 (1 - TPR) + 0.5 FPR, at the threshold where TPR first reaches 95%.

    That is the paper's text ("the misclassification probability when TPR is 95%"); the
    authors' script instead minimises over all thresholds, which can only be lower.
    """
    fprs, tprs = roc_points(pos, neg)
    i = np.searchsorted(tprs, tpr - 1e-12, side="left")
    return float(0.5 * (1 - tprs[i]) + 0.5 * fprs[i])


def mannwhitney_p(pos: np.ndarray, neg: np.ndarray) -> float:
    """One-sided Mann-Whitney U p-value for "positives score higher than negatives"."""
    return float(mannwhitneyu(pos, neg, alternative="greater").pvalue)


def compute_all(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """Every metric of ``METRICS`` plus ``n_pos`` and ``n_neg``.

    With no positives or no negatives a ranking metric is undefined: those values are NaN
    and the caller reports why instead of printing them as numbers.
    """
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    out: dict[str, float] = {}
    if len(pos) and len(neg):
        out.update(
            auroc=auroc(pos, neg), aupr_in=aupr_in(pos, neg), aupr_out=aupr_out(pos, neg),
            fpr_at_95tpr=fpr_at_tpr(pos, neg), detection_error=detection_error(pos, neg),
            mannwhitney_p=mannwhitney_p(pos, neg),
        )
    else:
        out.update({m: math.nan for m in METRICS})
    out.update(n_pos=len(pos), n_neg=len(neg))
    return out
