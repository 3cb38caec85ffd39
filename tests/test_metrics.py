"""Every metric against a value computed by hand."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_curve

from oodbench import metrics
from oodbench.metrics import fpr_at_tpr, roc_points

# Positives (trustworthy) should score high. Of the 3 x 2 = 6 (positive, negative) pairs,
# 3>2, 3>1 and 2>1 are ordered right, 2=2 is a tie (counts 1/2), 0.5 loses to both: 3.5 / 6.
POS = np.array([3.0, 2.0, 0.5])
NEG = np.array([2.0, 1.0])


def test_auroc_counts_ties_as_half():
    assert metrics.auroc(POS, NEG) == pytest.approx(3.5 / 6)


def test_aupr_in_by_hand():
    # Ranking by score, descending: 3(P), 2(P)/2(N) tied, 1(N), 0.5(P).
    # Thresholds: >=3: P=1/1; >=2: TP=2, FP=1 -> precision 2/3, recall 2/3; >=1: TP=2, FP=2;
    # >=0.5: TP=3, FP=2 -> precision 3/5. AP = sum over recall steps of precision:
    # 1/3*1 + 1/3*(2/3) + 1/3*(3/5).
    assert metrics.aupr_in(POS, NEG) == pytest.approx(1 / 3 + 2 / 9 + 1 / 5)


def test_aupr_out_by_hand():
    # Negatives as the positive class, scores negated. Descending negated scores: -0.5 (ID), -1 (N), -2 (N)/-2 (ID) tied, -3 (ID).
    # >= -0.5: TP 0 (recall 0); >= -1: TP 1, FP 1 -> precision 1/2, recall 1/2;
    # >= -2: TP 2, FP 2 -> precision 1/2, recall 1. AP = 1/2*1/2 + 1/2*1/2.
    assert metrics.aupr_out(POS, NEG) == pytest.approx(0.5)


def test_fpr_at_95_tpr_and_detection_error():
    pos = np.arange(100, 200, dtype=float)  # 100 positives
    neg = np.concatenate([np.arange(10) + 100.5, np.arange(90) - 1000.0])  # 10 interleave the bottom
    # TPR reaches 95% at threshold 105 (positives 105..199 = 95); negatives above it: 100.5..109.5
    # that are >= 105: 105.5..109.5 = 5 of 100 -> FPR 0.05.
    assert metrics.fpr_at_tpr(pos, neg) == pytest.approx(0.05)
    assert metrics.detection_error(pos, neg) == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)


def test_perfect_and_inverted_detectors():
    pos, neg = np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0])
    good = metrics.compute_all(pos, neg)
    assert good["auroc"] == 1.0 and good["fpr_at_95tpr"] == 0.0 and good["detection_error"] == 0.0
    bad = metrics.compute_all(neg, pos)
    assert bad["auroc"] == 0.0 and bad["fpr_at_95tpr"] == 1.0


def test_mann_whitney_matches_exact_permutation_p():
    # With no ties and tiny samples scipy uses the exact distribution: P(U >= u_obs).
    # pos = [4, 5], neg = [1, 2, 3]: U = 6, the maximum; exactly 1 of C(5,2) = 10 rankings reaches it.
    assert metrics.mannwhitney_p(np.array([4.0, 5.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.1)


def test_empty_side_gives_nan_and_counts():
    out = metrics.compute_all(np.array([1.0]), np.array([]))
    assert math.isnan(out["auroc"]) and out["n_pos"] == 1 and out["n_neg"] == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=40), st.lists(st.integers(-3, 3), min_size=1, max_size=40),
       st.floats(0.01, 1.0))
def test_roc_points_equal_scikit_learns_roc_curve(pos, neg, tpr):
    """Our ROC (used in tuning loops for speed) against scikit-learn's, ties included (small integer scores)."""
    pos, neg = np.array(pos, float) / 2, np.array(neg, float) / 2
    y, s = np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]
    fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
    ours = roc_points(pos, neg)
    assert np.array_equal(ours[0], fprs) and np.array_equal(ours[1], tprs)
    assert fpr_at_tpr(pos, neg, tpr) == float(fprs[np.searchsorted(tprs, tpr - 1e-12, side="left")])
