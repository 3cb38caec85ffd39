"""Every metric against a value computed by hand."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as scipy_stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

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
    # Here the minimum over thresholds is also 0.05 (at 110: 0.5 * 0.1 + 0; at 100: 0 + 0.5 * 0.1), so this
    # case cannot tell the two readings apart: test_detection_error_is_the_minimum_over_thresholds does.
    assert metrics.detection_error(pos, neg) == pytest.approx(0.5 * 0.05 + 0.5 * 0.05)


def test_perfect_and_inverted_detectors():
    pos, neg = np.array([5.0, 6.0, 7.0]), np.array([1.0, 2.0])
    good = metrics.compute_all(pos, neg)
    assert good["auroc"] == 1.0 and good["fpr_at_95tpr"] == 0.0 and good["detection_error"] == 0.0
    bad = metrics.compute_all(neg, pos)
    assert bad["auroc"] == 0.0 and bad["fpr_at_95tpr"] == 1.0


def test_mann_whitney_matches_exact_permutation_p():
    # With no ties and tiny samples scipy uses the exact distribution: P(U >= u_obs).
    # pos = [4, 5], neg = [1, 2, 3]: U = 6, the maximum; exactly 1 of C(5,2) = 10 rankings reaches it,
    # and 1 other (U = 0) is as extreme the other way: one-sided 0.1, two-sided 0.2.
    assert metrics.mannwhitney_p_greater(np.array([4.0, 5.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.1)
    assert metrics.mannwhitney_p(np.array([4.0, 5.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(0.2)


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


# -- the authors' readings (issue 20, items 1-3) ---------------------------------------------


def _authors_grid(pos, neg, precision=100_000):
    """ODIN's calMetric.py sweep, re-implemented: thresholds from the smallest score to the largest
    (end excluded) in steps of (end - start) / precision."""
    start, end = min(pos.min(), neg.min()), max(pos.max(), neg.max())
    return np.arange(start, end, (end - start) / precision)


def _authors_detection(pos, neg):
    """calMetric.detection(): error = min over the sweep of (share of positives < delta
    + share of negatives > delta) / 2, starting from 1.0."""
    deltas = _authors_grid(pos, neg)
    missed = (pos[None, :] < deltas[:, None]).mean(axis=1)
    accepted = (neg[None, :] > deltas[:, None]).mean(axis=1)
    return min(1.0, float(np.min((missed + accepted) / 2)))


def _authors_tpr95(pos, neg):
    """calMetric.tpr95(): the mean FPR (share of negatives > delta) over the sweep's thresholds whose
    TPR (share of positives >= delta) lies in [0.9495, 0.9505]."""
    deltas = _authors_grid(pos, neg)
    tpr = (pos[None, :] >= deltas[:, None]).mean(axis=1)
    fpr = (neg[None, :] > deltas[:, None]).mean(axis=1)
    band = (tpr >= 0.9495) & (tpr <= 0.9505)
    return float(fpr[band].sum() / band.sum())


@given(st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=50),
       st.lists(st.floats(-4, 4, allow_nan=False), min_size=1, max_size=50), st.integers(0, 3))
@settings(max_examples=300, deadline=None)
def test_point_metrics_equal_scikit_learns(pos, neg, grid):
    # our AUROC and average precisions repeat scikit-learn's arithmetic without its input validation; rounding the
    # scores to a grid makes ties, where the curves' construction matters most
    pos, neg = np.asarray(pos), np.asarray(neg)
    if grid:
        pos, neg = np.round(pos * grid) / grid, np.round(neg * grid) / grid
    y, s = np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg]
    assert metrics.auroc(pos, neg) == pytest.approx(roc_auc_score(y, s), rel=1e-12, abs=1e-15)
    assert metrics.aupr_in(pos, neg) == pytest.approx(average_precision_score(y, s), rel=1e-12, abs=1e-15)
    assert metrics.aupr_out(pos, neg) == pytest.approx(average_precision_score(1 - y, -s), rel=1e-12, abs=1e-15)


def test_detection_error_is_the_minimum_over_thresholds():
    pos, neg = np.array([1.0, 5.0, 6.0, 7.0]), np.array([0.0, 2.0, 3.0, 4.0])
    # At the first threshold with TPR >= 95% (1.0: every positive) three negatives are accepted:
    # 0.5 * 0 + 0.5 * 3/4 = 0.375, the old reading. Over all thresholds: at 5.0, TPR 3/4 and FPR 0
    # give 0.5 * 1/4 + 0 = 0.125; at 4.0, 0.5 * 1/4 + 0.5 * 1/4 = 0.25; at 6.0, 0.25; above 7, 0.5;
    # so the minimum is 0.125.
    assert metrics.detection_error(pos, neg) == pytest.approx(0.125)
    assert _authors_detection(pos, neg) == pytest.approx(0.125)
    fprs, tprs = roc_points(pos, neg)
    at_95 = np.searchsorted(tprs, 0.95 - 1e-12)
    assert 0.5 * (1 - tprs[at_95]) + 0.5 * fprs[at_95] == pytest.approx(0.375)  # what schema 2 reported


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=2, max_size=30, unique=True), st.integers(1, 29))
def test_detection_error_equals_the_authors_sweep(scores, n_pos):
    """Where no positive ties a negative, the minimum over ROC points is the sweep's minimum: a sweep point
    lands in every gap between distinct scores (gaps >= 1e-3, the grid's step 1e-5 of the range). (At a score
    that a positive and a negative share, a sweep point exactly on it counts the positive accepted and the
    negative rejected: ties broken in the detector's favour, which we do not copy.)"""
    if n_pos >= len(scores):
        return
    scores = np.array(scores) / 1000
    pos, neg = scores[:n_pos], scores[n_pos:]
    assert metrics.detection_error(pos, neg) == pytest.approx(_authors_detection(pos, neg), abs=1e-12)


def test_fpr_at_95_tpr_differs_from_the_authors_band_average():
    pos = np.r_[0.0, np.arange(10.0, 29.0)]  # 20 positives: 19 at 10..28, one at 0
    neg = np.array([2.0, 4.0, 6.0, 8.0])
    # Ours: the highest threshold with TPR >= 95% is 10 (19 of 20 positives); no negative scores >= 10: FPR 0.
    assert metrics.fpr_at_tpr(pos, neg) == 0.0
    # The authors': TPR is exactly 0.95 for every delta in (0, 10], where the FPR steps 1, 3/4, 1/2, 1/4, 0
    # over intervals of width 2 each: the sweep's mean is (1 + 3/4 + 1/2 + 1/4 + 0) / 5 = 0.5.
    assert _authors_tpr95(pos, neg) == pytest.approx(0.5, abs=1e-3)


def test_mann_whitney_two_sided_for_an_inverted_detector():
    pos, neg = np.arange(1.0, 6.0), np.arange(6.0, 11.0)  # every negative above every positive
    # Exact null distribution of U over C(10, 5) = 252 rankings: U = 0 and U = 25 once each, so the
    # two-sided p is 2/252 while "positives score higher" has p = P(U >= 0) = 1.
    assert metrics.mannwhitney_p(pos, neg) == pytest.approx(2 / 252)
    assert metrics.mannwhitney_p_greater(pos, neg) == pytest.approx(1.0)
    assert metrics.mannwhitney_p(pos, neg) == scipy_stats.mannwhitneyu(pos, neg, alternative="two-sided").pvalue
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(0, 1, 200), rng.normal(1, 1, 150)
    out = metrics.compute_all(pos, neg)
    assert out["mannwhitney_p"] == scipy_stats.mannwhitneyu(pos, neg, alternative="two-sided").pvalue < 1e-6
    assert out["mannwhitney_p_greater"] == scipy_stats.mannwhitneyu(pos, neg, alternative="greater").pvalue > 0.999


# -- selective classification on the mistakes source (item 4) --------------------------------

# Correct predictions (positives) and errors (negatives), by score: 0.9 C, 0.7 E, 0.6 C, 0.4 C, 0.2 E.
CORRECT, ERRORS = np.array([0.9, 0.6, 0.4]), np.array([0.7, 0.2])


def test_selective_metrics_by_hand():
    # Selective risk at coverage k/5, k = 1..5: 0, 1/2, 1/3, 1/4, 2/5 -> AURC = (0 + 1/2 + 1/3 + 1/4 + 2/5) / 5
    # = (89/60) / 5 = 89/300. The oracle (3 correct first): risks 0, 0, 0, 1/4, 2/5 -> (13/20) / 5 = 39/300,
    # so E-AURC = 50/300 = 1/6.
    assert metrics.aurc(CORRECT, ERRORS) == pytest.approx(89 / 300)
    assert metrics.e_aurc(CORRECT, ERRORS) == pytest.approx(1 / 6)
    # Generalized risk (errors accepted / 5) at coverage 0, 1/5, ..., 1: 0, 0, 1/5, 1/5, 1/5, 2/5; trapezoids of
    # width 1/5: (0 + 1/10 + 1/5 + 1/5 + 3/10) / 5 = 0.16. Traub et al.'s closed form, acc = 3/5 and AUROC = 4/6
    # (correct above error in 4 of 6 pairs): 3/5 * 2/5 * 1/3 + (2/5)^2 / 2 = 0.08 + 0.08 = 0.16.
    assert metrics.augrc(CORRECT, ERRORS) == pytest.approx(0.16)
    # Selective accuracy at k = 1..5: 1, 1/2, 2/3, 3/4, 3/5: only coverage 1/5 reaches 95%.
    assert metrics.coverage_at_accuracy(CORRECT, ERRORS) == pytest.approx(0.2)
    out = metrics.compute_all(CORRECT, ERRORS, mistakes=True)
    assert out["aurc"] == pytest.approx(89 / 300) and out["coverage_at_95acc"] == pytest.approx(0.2)
    elsewhere = metrics.compute_all(CORRECT, ERRORS)
    assert all(math.isnan(elsewhere[m]) for m in metrics.MISTAKES_ONLY)


def _fd_shifts_loop(correct_scores, error_scores):
    """AURC, E-AURC and AUGRC as FD-Shifts defines them, one coverage level at a time (no ties)."""
    confidence = np.r_[correct_scores, error_scores]
    risk = np.r_[np.zeros(len(correct_scores)), np.ones(len(error_scores))]
    n = len(risk)

    def curve(order):
        selective, generalized = [], [0.0]
        for k in range(1, n + 1):
            accepted = risk[order[:k]]
            selective.append(accepted.sum() / k)
            generalized.append(accepted.sum() / n)
        aurc = sum(selective) / n
        augrc = sum((generalized[k - 1] + generalized[k]) / 2 / n for k in range(1, n + 1))
        return aurc, augrc

    aurc, augrc = curve(np.argsort(-confidence, kind="stable"))
    oracle, _ = curve(np.argsort(risk, kind="stable"))
    return aurc, aurc - oracle, augrc


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=30, unique=True), st.integers(1, 29))
def test_selective_metrics_equal_a_coverage_loop(scores, n_errors):
    if n_errors >= len(scores):
        return
    scores = np.array(scores)
    correct, errors = scores[n_errors:], scores[:n_errors]
    aurc, eaurc, augrc = _fd_shifts_loop(correct, errors)
    assert metrics.aurc(correct, errors) == pytest.approx(aurc, abs=1e-12)
    assert metrics.e_aurc(correct, errors) == pytest.approx(eaurc, abs=1e-12)
    assert metrics.augrc(correct, errors) == pytest.approx(augrc, abs=1e-12)
    accuracies = [(np.sort(correct)[::-1] >= t).sum() / (scores >= t).sum() for t in np.sort(scores)[::-1]]
    covered = [(scores >= t).mean() for t, a in zip(np.sort(scores)[::-1], accuracies) if a >= 0.95]
    assert metrics.coverage_at_accuracy(correct, errors) == pytest.approx(max(covered, default=0.0))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=30), st.lists(st.integers(-3, 3), min_size=1, max_size=30))
def test_augrc_equals_traubs_closed_form_with_ties(correct, errors):
    correct, errors = np.array(correct, float), np.array(errors, float)
    acc = len(correct) / (len(correct) + len(errors))
    auroc = roc_auc_score(np.r_[np.ones(len(correct)), np.zeros(len(errors))], np.r_[correct, errors])
    assert metrics.augrc(correct, errors) == pytest.approx(acc * (1 - acc) * (1 - auroc) + (1 - acc) ** 2 / 2)
    assert 0 <= metrics.e_aurc(correct, errors) <= metrics.aurc(correct, errors) <= 1


# -- bootstrap intervals (item 5) and small samples (item 6) ---------------------------------


def _plain_bootstrap(pos, neg, entropy, n_resamples, mistakes):
    """The documented draws, then every statistic by scikit-learn (or a direct threshold loop) per resample."""
    pos_rng, neg_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(2))
    pos_idx = pos_rng.integers(0, len(pos), (n_resamples, len(pos)))
    neg_idx = neg_rng.integers(0, len(neg), (n_resamples, len(neg)))
    stats = {"auroc": [], "fpr_at_95tpr": [], "aupr_in": [], "aurc": []}
    for b in range(n_resamples):
        p, q = pos[pos_idx[b]], neg[neg_idx[b]]
        y, s = np.r_[np.ones(len(p)), np.zeros(len(q))], np.r_[p, q]
        stats["auroc"].append(roc_auc_score(y, s))
        stats["aupr_in"].append(average_precision_score(y, s))
        fprs, tprs, _ = roc_curve(y, s, drop_intermediate=False)
        stats["fpr_at_95tpr"].append(fprs[np.argmax(tprs >= 0.95 - 1e-12)])
        aurc = 0.0
        for t in np.unique(s)[::-1]:  # each distinct score accepted with everything above it
            accepted = s >= t
            aurc += (s == t).sum() / len(s) * (1 - y[accepted]).sum() / accepted.sum()
        stats["aurc"].append(aurc)
    names = ["auroc", "fpr_at_95tpr", "aupr_in"] + (["aurc"] if mistakes else [])
    out = {}
    for name in names:
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = np.percentile(stats[name], [2.5, 97.5])
    return out


def test_bootstrap_matches_a_plain_numpy_bootstrap():
    rng = np.random.default_rng(7)
    pos, neg = np.round(rng.normal(1, 1, 40), 1), np.round(rng.normal(0, 1, 25), 1)  # rounded: ties too
    entropy = metrics.row_entropy(3, "msp", "mistakes")
    ours = metrics.bootstrap_intervals(pos, neg, entropy, mistakes=True, n_resamples=300)
    expected = _plain_bootstrap(pos, neg, entropy, 300, mistakes=True)
    assert ours.keys() == expected.keys()
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-12), key


def test_bootstrap_covers_the_estimate_and_is_deterministic():
    rng = np.random.default_rng(11)
    pos, neg = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    entropy = metrics.row_entropy(0, "gmm[k=10]", "ood:noise")
    first = metrics.compute_all(pos, neg, entropy=entropy)
    assert first == metrics.compute_all(pos, neg, entropy=entropy)
    for name in ("auroc", "fpr_at_95tpr", "aupr_in"):
        assert first[f"{name}_ci_low"] <= first[name] <= first[f"{name}_ci_high"], name
        assert first[f"{name}_ci_low"] < first[f"{name}_ci_high"]
    other = metrics.compute_all(pos, neg, entropy=metrics.row_entropy(1, "gmm[k=10]", "ood:noise"))
    assert other["auroc_ci_low"] != first["auroc_ci_low"]  # another seed, another stream
    assert math.isnan(first["aurc_ci_low"])  # AURC's interval only on the mistakes source
    # An AUROC of 0.76 on 300 + 200 inputs: the normal approximation's standard error
    # (Hanley & McNeil) is about 0.021, so the 95% interval is about 0.08 wide.
    assert 0.06 < first["auroc_ci_high"] - first["auroc_ci_low"] < 0.10


def test_small_sample_flag():
    assert metrics.compute_all(np.arange(30.0), np.arange(29.0))["small_sample"] is True
    assert metrics.compute_all(np.arange(30.0), np.arange(30.0))["small_sample"] is False
    assert metrics.compute_all(np.arange(30.0), np.array([]))["small_sample"] is True


def test_decision_rule_by_hand():
    """Issue 20 item 14. Scores separated by a wide gap: on every fold the threshold of the other folds
    lies halfway across the gap (near 14.5), so every failure and no trustworthy input is rejected."""
    pos, neg = np.arange(20.0, 30.0), np.arange(0.0, 10.0)
    rule = metrics.decision_rule(pos, neg, [0])
    assert rule == {"rule_detection_rate": 1.0, "rule_false_rejection_rate": 0.0, "rule_precision": 1.0}
    # By hand, on one split: failures {1, 2, 4}, trustworthy {3, 5}. Rejecting <= 1, 2, 3, 4, 5 gives
    # F1 = 2TP/(rejected + 3) = 2/4, 4/5, 4/6, 6/7, 6/8: rejecting up to 4 is best, T halfway to 5.
    assert metrics.f1_threshold(np.array([3.0, 5.0]), np.array([1.0, 2.0, 4.0])) == 4.5
    assert metrics.f1_threshold(np.array([1.0]), np.array([2.0, 3.0])) == math.inf  # rejecting all is best
    assert all(math.isnan(v) for v in metrics.decision_rule(np.arange(5.0), np.array([1.0]), [0]).values())


def _sklearn_decision_rule(pos, neg, entropy, k=5):
    """The rule re-implemented with scikit-learn: the threshold of each fold maximises f1_score over the
    other folds' distinct scores (failures are the positive class, rejected when score <= t), the
    threshold then moved halfway to the next distinct score."""
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(np.random.SeedSequence(entropy).spawn(3)[2])
    folds = [metrics.decision_folds(len(side), k, rng) for side in (pos, neg)]
    scores = np.concatenate([pos, neg])
    failure = np.r_[np.zeros(len(pos)), np.ones(len(neg))].astype(int)
    fold = np.concatenate(folds)
    rejected = np.zeros(len(scores), dtype=bool)
    for f in range(k):
        train = fold != f
        candidates = np.unique(scores[train])
        f1 = [f1_score(failure[train], (scores[train] <= t).astype(int)) for t in candidates]
        best = int(np.argmax(f1))
        threshold = (candidates[best] + candidates[best + 1]) / 2 if best + 1 < len(candidates) else np.inf
        rejected[~train] = scores[~train] < threshold
    caught = int(np.sum(rejected & (failure == 1)))
    return {"rule_detection_rate": caught / len(neg),
            "rule_false_rejection_rate": np.sum(rejected & (failure == 0)) / len(pos),
            "rule_precision": caught / rejected.sum()}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(5, 60), st.integers(5, 60), st.sampled_from([0.0, 0.5, 2.0]))
def test_decision_rule_equals_scikit_learns_f1(seed, n_pos, n_neg, shift):
    rng = np.random.default_rng(seed)
    pos, neg = np.round(rng.normal(shift, 1, n_pos), 1), np.round(rng.normal(0, 1, n_neg), 1)  # ties too
    entropy = metrics.row_entropy(seed, "gmm", "mistakes")
    ours, expected = metrics.decision_rule(pos, neg, entropy), _sklearn_decision_rule(pos, neg, entropy)
    for key in expected:
        assert ours[key] == pytest.approx(expected[key], abs=1e-12), key
