"""Detection metrics. One convention: positives are the trustworthy inputs, scored higher.

``pos`` holds the scores of trustworthy inputs (in-distribution, clean, correctly
classified), ``neg`` those of the failure source. A perfect detector has AUROC 1.

Where a paper's released code computes a metric differently from its text, the function says
which one it follows (``detection_error``, ``fpr_at_tpr``, ``mannwhitney_p``). On the
``mistakes`` source the positives are the correct predictions and the negatives the errors, so
the selective-classification metrics (``aurc``, ``e_aurc``, ``augrc``, ``coverage_at_accuracy``)
apply there and only there. ``bootstrap_intervals`` gives seeded, stratified percentile
intervals of AUROC, FPR at 95% TPR, AUPR-In and (on mistakes) AURC. ``decision_rule`` gives the
operating point of the feature-GMM paper's per-sample test, its threshold cross-validated.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

# scipy.stats and sklearn.metrics are imported where they are used: together they take ~1.8 s to import, which
# every command (``oodbench --help`` included) paid while the constants below were all it needed.

#: Point metrics of every row, in results.csv's order. The last four are the mistakes source's only
#: (empty elsewhere; ``MISTAKES_ONLY``).
METRICS = ("auroc", "aupr_in", "aupr_out", "fpr_at_95tpr", "detection_error", "mannwhitney_p",
           "mannwhitney_p_greater", "aurc", "e_aurc", "augrc", "coverage_at_95acc",
           "rule_detection_rate", "rule_false_rejection_rate", "rule_precision")
#: The operating point of the feature-GMM paper's per-sample decision rule (``decision_rule``).
RULE_METRICS = ("rule_detection_rate", "rule_false_rejection_rate", "rule_precision")
#: Folds of the decision rule's cross-validated threshold.
RULE_FOLDS = 5
#: Metrics with a bootstrap interval, written as ``<metric>_ci_low`` and ``<metric>_ci_high``.
CI_METRICS = ("auroc", "fpr_at_95tpr", "aupr_in", "aurc")
INTERVALS = tuple(f"{m}_ci_{side}" for m in CI_METRICS for side in ("low", "high"))
#: Columns that only the ``mistakes`` source has (selective classification).
MISTAKES_ONLY = ("aurc", "e_aurc", "augrc", "coverage_at_95acc", "aurc_ci_low", "aurc_ci_high")
#: Metrics where lower is better.
LOWER_IS_BETTER = ("fpr_at_95tpr", "detection_error", "mannwhitney_p", "mannwhitney_p_greater", "aurc", "e_aurc",
                   "augrc", "rule_false_rejection_rate")
#: A row with fewer positives or negatives than this is flagged ``small_sample``.
SMALL_SAMPLE = 30
#: Bootstrap resamples per interval, and the interval's level.
N_RESAMPLES = 1000
CI_LEVEL = 0.95


def _curve_counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, true positives) accepted at each distinct score as threshold, highest first:
    scikit-learn's ``_binary_clf_curve`` step for step (a stable sort, float64 cumulative counts)."""
    scores = np.concatenate([pos, neg]).astype(np.float64)
    positive = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    order = np.argsort(scores, kind="mergesort")[::-1]
    scores, positive = scores[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    true_positives = np.cumsum(positive)[ends]
    return 1 + ends - true_positives, true_positives


# The point metrics repeat scikit-learn's arithmetic (``roc_auc_score``, ``average_precision_score``, ``roc_curve``)
# without its input validation, which cost ~5 ms a row, a quarter of every row's metrics, and more than the curves
# themselves in tuning loops (ODIN computes 210 per failure source); tests/test_metrics.py holds them to
# scikit-learn's values.

def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve; ties count one half (the Mann-Whitney convention).

    scikit-learn's ``roc_auc_score``: the trapezoidal area under ``roc_curve``'s points (collinear
    ones dropped, (0, 0) prepended)."""
    fps, tps = _curve_counts(pos, neg)
    if len(fps) > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps = fps[keep], tps[keep]
    return float(np.trapezoid(np.r_[0.0, tps] / tps[-1], np.r_[0.0, fps] / fps[-1]))


def _average_precision(pos: np.ndarray, neg: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score`` with ``pos`` the positive class: sum over thresholds of
    (R_n - R_{n-1}) P_n, from ``precision_recall_curve``'s points."""
    fps, tps = _curve_counts(pos, neg)
    precision = np.r_[(tps / (tps + fps))[::-1], 1]
    recall = np.r_[(tps / tps[-1])[::-1], 0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def aupr_in(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with the trustworthy inputs as the positive class (ODIN's AUPR-In)."""
    return _average_precision(pos, neg)


def aupr_out(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision with the failures as the positive class and scores negated (AUPR-Out)."""
    return _average_precision(-np.asarray(neg, np.float64), -np.asarray(pos, np.float64))


def roc_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct score used as threshold, from (0, 0) up: scikit-learn's
    ``roc_curve(drop_intermediate=False)`` to the last bit."""
    false_positives, true_positives = _curve_counts(pos, neg)
    return (np.r_[0, false_positives] / false_positives[-1], np.r_[0, true_positives] / true_positives[-1])


def fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    """FPR at the highest threshold whose TPR reaches ``tpr`` (no interpolation).

    Not the authors' number: ODIN's ``calMetric.tpr95`` (which Lee et al.'s scripts reuse) sweeps
    a uniform grid of thresholds between the smallest and largest score and averages the FPR of
    the grid points whose TPR lies in [0.9495, 0.9505], so each ROC point is weighted by the width
    of its threshold interval, and where no grid point has TPR in that band (fewer than ~1,000
    positives) it divides by zero. Ours is defined for every sample size and lies on the ROC
    curve; the two agree when a single ROC point has TPR in the band and the sweep lands on it.
    """
    fprs, tprs = roc_points(pos, neg)
    return float(fprs[np.searchsorted(tprs, tpr - 1e-12, side="left")])


def detection_error(pos: np.ndarray, neg: np.ndarray) -> float:
    """The authors' detection error: min over all thresholds of 0.5 (1 - TPR) + 0.5 FPR.

    That is what ODIN's ``calMetric.detection()`` and Lee et al.'s DTACC (= 1 - this) compute,
    sweeping thresholds; every threshold that matters is a distinct score, so the minimum over
    the ROC points is the sweep's minimum without its grid (ODIN's text instead says "when TPR is
    95%"; results.csv of schema version 2 and earlier held that reading). The points (0, 0) and
    (1, 1) are thresholds too, so the value is at most 0.5.
    """
    fprs, tprs = roc_points(pos, neg)
    return float(np.min(0.5 * (1 - tprs) + 0.5 * fprs))


def mannwhitney_p(pos: np.ndarray, neg: np.ndarray) -> float:
    """Two-sided Mann-Whitney U p-value (H1: the two score distributions differ), as the feature-GMM
    paper tests P_correct != P_wrong with U = min(U_C, U_W). The direction is AUROC's (above or
    below 0.5): an inverted detector gets a small p too."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(pos, neg, alternative="two-sided").pvalue)


def mannwhitney_p_greater(pos: np.ndarray, neg: np.ndarray) -> float:
    """One-sided Mann-Whitney U p-value for "positives score higher than negatives" (near 1 when inverted)."""
    from scipy.stats import mannwhitneyu

    return float(mannwhitneyu(pos, neg, alternative="greater").pvalue)


def _risk_steps(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct score, from the highest down: (inputs at that score, accepted, errors accepted).

    Accepting every input scored at least the threshold; an error is a negative (the mistakes
    source's misclassified inputs). Tied inputs are accepted or rejected together.
    """
    scores = np.concatenate([pos, neg]).astype(np.float64)
    error = np.concatenate([np.zeros(len(pos)), np.ones(len(neg))])
    values, inverse = np.unique(-scores, return_inverse=True)  # ascending -score = descending score
    count = np.bincount(inverse, minlength=len(values)).astype(np.float64)
    errors = np.bincount(inverse, weights=error, minlength=len(values))
    return count, np.cumsum(count), np.cumsum(errors)


def aurc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the risk-coverage curve (Geifman et al.; FD-Shifts' AURC): the mean over coverage
    levels k/n, k = 1..n, of the selective risk, the error rate among the k best-scored inputs.

    Tied inputs enter together, so each of a tie's inputs gets the risk of the whole tie accepted.
    """
    count, accepted, errors = _risk_steps(pos, neg)
    return float(np.sum(count * errors / accepted) / accepted[-1])


def oracle_aurc(n_correct: int, n_errors: int) -> float:
    """AURC of the oracle that scores every correct prediction above every error:
    (1/n) sum_{k > n_correct} (k - n_correct) / k."""
    n = n_correct + n_errors
    k = np.arange(n_correct + 1, n + 1, dtype=np.float64)
    return float(np.sum((k - n_correct) / k) / n) if n else math.nan


def e_aurc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Excess AURC: ``aurc`` minus the oracle's, with the same accuracy (0 for a perfect ranking)."""
    return aurc(pos, neg) - oracle_aurc(len(pos), len(neg))


def augrc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the generalized risk-coverage curve (Traub et al. 2024): the generalized risk at a
    threshold is P(error and accepted) = (errors accepted) / n, integrated over coverage by the
    trapezoid rule from (0, 0), tied inputs entering together. Equals
    acc (1 - acc) (1 - AUROC) + (1 - acc)^2 / 2 with acc the accuracy (the paper's closed form).
    """
    count, accepted, errors = _risk_steps(pos, neg)
    n = accepted[-1]
    risk = np.r_[0.0, errors] / n
    return float(np.sum(count / n * (risk[1:] + risk[:-1]) / 2))


def coverage_at_accuracy(pos: np.ndarray, neg: np.ndarray, accuracy: float = 0.95) -> float:
    """The largest coverage (share of inputs accepted, highest scores first, ties together) at which
    the selective accuracy (correct among accepted) is at least ``accuracy``; 0 where none is."""
    count, accepted, errors = _risk_steps(pos, neg)
    ok = (accepted - errors) >= accuracy * accepted - 1e-9
    return float(accepted[ok].max() / accepted[-1]) if ok.any() else 0.0


def f1_threshold(pos: np.ndarray, neg: np.ndarray) -> float:
    """The threshold T of the rule "reject an input as a failure if its score < T" that maximises
    F1 of the rejected inputs against the failures (the harmonic mean of precision, failures among
    the rejected, and recall, failures rejected). Among the distinct scores s_1 < ... < s_m,
    rejecting up to s_j is best (of equal F1, the lowest j: fewest rejections); T lies halfway
    to s_(j+1), so an unseen input between the two sides is judged by the nearer one (infinity
    when rejecting everything is best: every input is rejected)."""
    scores = np.concatenate([pos, neg]).astype(np.float64)
    failure = np.concatenate([np.zeros(len(pos)), np.ones(len(neg))])
    values, inverse = np.unique(scores, return_inverse=True)  # ascending: rejecting up to values[j]
    rejected = np.cumsum(np.bincount(inverse, minlength=len(values)))
    caught = np.cumsum(np.bincount(inverse, weights=failure, minlength=len(values)))
    f1 = 2 * caught / (rejected + len(neg))  # 2 TP / (2 TP + FP + FN), with TP + FP = rejected, TP + FN = n_neg
    best = int(np.argmax(f1))
    return float((values[best] + values[best + 1]) / 2 if best + 1 < len(values) else math.inf)


def decision_folds(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Fold of each of ``n`` inputs: a seeded random order dealt round-robin into ``k`` folds."""
    folds = np.empty(n, dtype=np.int64)
    folds[rng.permutation(n)] = np.arange(n) % k
    return folds


def decision_rule(pos: np.ndarray, neg: np.ndarray, entropy, k: int = RULE_FOLDS) -> dict[str, float]:
    """The feature-GMM paper's per-sample test (Section 3.3), as an operating point of any detector.

    "A test sample X is rejected as being misclassified if P(f(X)) < T. The value of the threshold
    is chosen by cross-validation ... to obtain a good trade-off between precision and recall."
    Here: stratified ``k``-fold cross-validation over the row's inputs (folds: ``decision_folds``
    of the positives, then of the negatives, from ``SeedSequence(entropy)``; ``k`` at most the
    smaller side; the generator: the third child of ``SeedSequence(entropy)``, the bootstrap's
    two being the first); on each fold, T is ``f1_threshold`` of the other folds (the precision/recall
    trade-off made concrete as the best F1) and the fold's inputs scored below T are rejected. Over
    all folds: ``rule_detection_rate`` (failures rejected / failures, higher is better),
    ``rule_false_rejection_rate`` (trustworthy inputs rejected / trustworthy inputs, lower is
    better), ``rule_precision`` (failures among the rejected; NaN where nothing is rejected).
    NaN where a side has fewer than 2 inputs.
    """
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    out = dict.fromkeys(RULE_METRICS, math.nan)
    k = min(k, len(pos), len(neg))
    if k < 2:
        return out
    # The third child of the row's entropy: the bootstrap draws from the first two
    rng = np.random.default_rng(np.random.SeedSequence(entropy).spawn(3)[2])
    pos_fold, neg_fold = decision_folds(len(pos), k, rng), decision_folds(len(neg), k, rng)
    pos_rejected = neg_rejected = 0
    for fold in range(k):
        threshold = f1_threshold(pos[pos_fold != fold], neg[neg_fold != fold])
        pos_rejected += int(np.sum(pos[pos_fold == fold] < threshold))
        neg_rejected += int(np.sum(neg[neg_fold == fold] < threshold))
    out.update(rule_detection_rate=neg_rejected / len(neg), rule_false_rejection_rate=pos_rejected / len(pos),
               rule_precision=neg_rejected / (neg_rejected + pos_rejected) if neg_rejected + pos_rejected else math.nan)
    return out


def row_entropy(seed: int, *names: str) -> list[int]:
    """Entropy of a row's bootstrap: the run's seed and the first 64 bits of sha256 of the row's
    names (detector, source) joined by '|', so every row gets its own reproducible stream."""
    digest = hashlib.sha256("|".join(names).encode("utf-8")).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def bootstrap_intervals(pos: np.ndarray, neg: np.ndarray, entropy, *, mistakes: bool = False,
                        n_resamples: int = N_RESAMPLES, level: float = CI_LEVEL) -> dict[str, float]:
    """Stratified percentile bootstrap intervals: ``{metric}_ci_low``/``_ci_high`` for ``CI_METRICS``
    (``aurc`` only when ``mistakes``).

    The draws: ``SeedSequence(entropy).spawn(2)`` gives one generator for the positives and one
    for the negatives; resample b takes ``integers(0, n_pos, n_pos)`` positives and
    ``integers(0, n_neg, n_neg)`` negatives (with replacement, the b-th row of one
    ``(n_resamples, n)`` draw from each generator). Each statistic is computed on each resample
    exactly as the point metric is; the bounds are ``np.percentile``'s (linear) of the
    (1 - level)/2 and (1 + level)/2 quantiles. Vectorised: a resample is a vector of counts per
    distinct score of the original sample, so the ROC of all resamples is one cumulative sum.
    """
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    n_pos, n_neg = len(pos), len(neg)
    names = [m for m in CI_METRICS if mistakes or m not in MISTAKES_ONLY]
    _, inverse = np.unique(-np.concatenate([pos, neg]), return_inverse=True)  # level 0 = highest score
    levels = int(inverse.max()) + 1
    pos_level, neg_level = inverse[:n_pos], inverse[n_pos:]
    pos_cols = np.unique(pos_level)
    pos_rng, neg_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(entropy).spawn(2))
    stats = {m: np.empty(n_resamples) for m in names}
    # Chunks of about 64k counts keep each chunk's arrays in the CPU's cache: measured 40% faster than one
    # chunk for the default benchmark's sources (~600 inputs). The draws do not depend on the chunking.
    chunk = max(1, min(n_resamples, 65_536 // max(levels, n_pos, n_neg)))
    for start in range(0, n_resamples, chunk):
        c = min(chunk, n_resamples - start)
        offset = (np.arange(c) * levels)[:, None]
        p = np.bincount((pos_level[pos_rng.integers(0, n_pos, (c, n_pos))] + offset).ravel(),
                        minlength=c * levels).reshape(c, levels)
        q = np.bincount((neg_level[neg_rng.integers(0, n_neg, (c, n_neg))] + offset).ravel(),
                        minlength=c * levels).reshape(c, levels)
        # Counts are summed as integers (exact, and ~20x faster than a cumulative sum cast to float64 as it goes)
        fp = np.cumsum(q, axis=1)  # negatives accepted at each threshold, highest first
        # Only the levels where positives lie can hold positives: the rest add nothing to the sums below.
        p_at, q_at, fp_at = p[:, pos_cols], q[:, pos_cols], fp[:, pos_cols]
        tp_at = np.cumsum(p_at, axis=1)
        part = slice(start, start + c)
        # A positive loses to the negatives at or above its score, a tie counting one half.
        lost = np.einsum("ij,ij->i", p_at, fp_at) - 0.5 * np.einsum("ij,ij->i", p_at, q_at)
        stats["auroc"][part] = 1.0 - lost / (n_pos * n_neg)
        first = np.argmax(tp_at >= (0.95 - 1e-12) * n_pos, axis=1)  # TPR first reaches 95% at a positive's level
        stats["fpr_at_95tpr"][part] = fp_at[np.arange(c), first] / n_neg
        precision = tp_at / np.maximum(tp_at + fp_at, 1)  # the maximum only where nothing is accepted yet: 0 / 1
        stats["aupr_in"][part] = np.einsum("ij,ij->i", p_at, precision) / n_pos
        if mistakes:
            accepted = np.maximum(np.cumsum(p, axis=1) + fp, 1)  # 1 where nothing is accepted yet (p, q are 0)
            stats["aurc"][part] = np.einsum("ij,ij->i", p + q, fp / accepted) / (n_pos + n_neg)
    tails = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out = {}
    for m in names:
        low, high = np.percentile(stats[m], tails)
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = float(low), float(high)
    return out


def compute_all(pos: np.ndarray, neg: np.ndarray, *, mistakes: bool = False,
                entropy=None) -> dict[str, float]:
    """Every metric of ``METRICS`` and its ``INTERVALS``, ``n_pos``, ``n_neg`` and ``small_sample``.

    ``mistakes``: the source is the classifier's mistakes (positives = correct predictions), so the
    selective-classification metrics apply; elsewhere they are NaN (empty in the CSV).
    ``entropy``: the bootstrap's seed material, ``row_entropy(run_seed, detector, source)`` in a
    run; without it ``[0]``. With no positives or no negatives a ranking metric is undefined: those
    values are NaN and the caller reports why instead of printing them as numbers.
    """
    pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
    out: dict[str, float] = {m: math.nan for m in (*METRICS, *INTERVALS)}
    if len(pos) and len(neg):
        out.update(
            auroc=auroc(pos, neg), aupr_in=aupr_in(pos, neg), aupr_out=aupr_out(pos, neg),
            fpr_at_95tpr=fpr_at_tpr(pos, neg), detection_error=detection_error(pos, neg),
            mannwhitney_p=mannwhitney_p(pos, neg), mannwhitney_p_greater=mannwhitney_p_greater(pos, neg),
        )
        if mistakes:
            out.update(aurc=aurc(pos, neg), e_aurc=e_aurc(pos, neg), augrc=augrc(pos, neg),
                       coverage_at_95acc=coverage_at_accuracy(pos, neg))
        entropy = [0] if entropy is None else entropy
        out.update(bootstrap_intervals(pos, neg, entropy, mistakes=mistakes))
        out.update(decision_rule(pos, neg, entropy))
    out.update(n_pos=len(pos), n_neg=len(neg), small_sample=bool(min(len(pos), len(neg)) < SMALL_SAMPLE))
    return out
