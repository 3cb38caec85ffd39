"""Post-hoc scores read off the classifier's logits alone: energy, entropy, GEN and KL-matching.

All are computed in float64 from ``log_softmax``/``logsumexp`` of the float32 logits, so that
confident inputs keep distinct scores where a float32 softmax would saturate at 1.
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy.special import log_softmax, logsumexp

from oodbench.api import Detector, FitContext, PluginError, SplitView

#: The smallest positive normal float64: a class template's probability is floored here before its
#: log, so that a template probability that underflowed to 0 gives a large but finite KL divergence.
_TINY = np.finfo(np.float64).tiny


def _log_probs(logits: np.ndarray) -> np.ndarray:
    return log_softmax(np.asarray(logits, dtype=np.float64), axis=1)


class _NothingFitted(Detector):
    """A detector read off the logits as they are: its stored state is empty, so storing it costs nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        pass


class Energy(_NothingFitted):
    """Energy score (Liu et al. 2020): T * logsumexp(logits / T), the negative free energy.

    Paper: Liu, Wang, Owens & Li, "Energy-based Out-of-distribution Detection", NeurIPS 2020:
    E(x; f) = -T log sum_c exp(f_c(x) / T); inputs with low energy are in-distribution.
    Score: -E(x) = T * logsumexp_c(f_c(x) / T), in float64. Higher = more trustworthy.
    Needs: logits only. Fit: nothing.
    Options: temperature=1.0, the paper's T (it uses T = 1 for its post-hoc results).
    """

    name = "energy"

    def __init__(self, *, temperature: Annotated[float, Field(gt=0)] = 1.0):
        self.temperature = temperature

    def score(self, view: SplitView) -> np.ndarray:
        t = float(self.temperature)
        return t * logsumexp(view.logits.astype(np.float64) / t, axis=1)


class Entropy(_NothingFitted):
    """Negative entropy of the softmax: sum_c p_c log p_c (a peaked softmax is trustworthy).

    Score: -H(softmax(f(x))) = sum_c p_c log p_c with p = softmax(logits), computed as
    sum_c exp(log_softmax_c) * log_softmax_c in float64 (no clipping of p: a class whose
    probability underflows contributes exactly 0, its limit). Higher = more trustworthy.
    Needs: logits only. Fit: nothing.
    pytorch-ood's ``Entropy`` returns H (higher = more OOD) after clipping p to [1e-7, 1]; the
    two agree up to sign wherever every probability is above 1e-7.
    """

    name = "entropy"

    def score(self, view: SplitView) -> np.ndarray:
        log_p = _log_probs(view.logits)
        return (np.exp(log_p) * log_p).sum(1)


class GEN(_NothingFitted):
    """GEN (Liu et al., CVPR 2023): minus the generalized entropy of the top-M softmax probabilities.

    Paper: Liu, Lochman & Zach, "GEN: Pushing the Limits of Softmax-Based Out-of-Distribution
    Detection", CVPR 2023: G_gamma(p) = sum_{j in top-M} p_j^gamma (1 - p_j)^gamma over the M
    largest softmax probabilities; the authors' code scores -G_gamma (a sum, not a mean).
    Score: -G_gamma(softmax(f(x))), M = min(M, number of classes), in float64. Higher = more
    trustworthy. Needs: logits only. Fit: nothing.
    Options: gamma=0.1 (the paper's); M=100 (the paper's; all classes when there are fewer).
    Numerics: each term is exp(gamma (log p_j + log(1 - p_j))) from log_softmax, with
    1 - p_max taken as the sum of the other probabilities, so a confident input's score does not
    round to the same value as every other confident input's, and no probability is clipped.
    pytorch-ood's ``GEN`` averages the terms instead of summing them (its score is G / M) and clamps
    p to [1e-7, 1 - 1e-7]; away from the clamp the two differ by the factor -M.
    """

    name = "gen"

    def __init__(self, *, gamma: Annotated[float, Field(gt=0)] = 0.1, M: Annotated[int, Field(ge=1)] = 100):
        self.gamma, self.M = gamma, M

    def score(self, view: SplitView) -> np.ndarray:
        log_p = _log_probs(view.logits)
        n, classes = log_p.shape
        if n == 0:
            return np.zeros(0)
        m = min(self.M, classes)
        # log(1 - p_j): by subtraction for every class but the top one (p_j <= 1/2 there, no
        # cancellation); for the top class as log of the sum of the others' probabilities.
        log_q = np.log1p(-np.exp(np.minimum(log_p, np.log(0.5))))
        top = log_p.argmax(1)
        rows = np.arange(n)
        if classes > 1:
            others = log_p.copy()
            others[rows, top] = -np.inf
            log_q[rows, top] = logsumexp(others, axis=1)
        else:
            log_q[rows, top] = -np.inf  # one class: p = 1, 1 - p = 0
        order = np.argsort(-log_p, axis=1, kind="stable")[:, :m]
        terms = np.exp(self.gamma * (np.take_along_axis(log_p, order, 1) + np.take_along_axis(log_q, order, 1)))
        return -terms.sum(1)


class KLMatching(Detector):
    """KL-matching (Hendrycks et al. 2022): minus the KL divergence of the softmax to its closest class template.

    Paper: Hendrycks, Basart, Mazeika, Zou, Kwon, Mostajabi, Steinhardt & Song, "Scaling
    Out-of-Distribution Detection for Real-World Settings", ICML 2022: for each class k, the
    template d_k is the mean softmax of the validation inputs the classifier *predicts* as k (no
    labels are used); an input's anomaly score is min_k KL(p(x) || d_k).
    Score: -min_k KL(p || d_k) = -min_k sum_c p_c (log p_c - log d_k,c), in float64, where the
    minimum runs over the classes predicted for at least one validation input (as pytorch-ood's
    ``KLMatching``). Higher = more trustworthy. Needs: logits only.
    Fit: the templates, on the in-distribution validation split (``ctx.val``), as the paper and
    OpenOOD do. A template probability that underflowed to 0 is floored at the smallest normal
    float64 before its log, so the score stays finite (pytorch-ood floors log 0 at the most
    negative float instead).
    """

    name = "kl-matching"

    def __init__(self) -> None:
        self.templates: np.ndarray | None = None  # K x C
        self.classes: np.ndarray | None = None  # K: the predicted class of each template

    def fit(self, ctx: FitContext) -> None:
        log_p = _log_probs(ctx.val.logits)
        if len(log_p) == 0:
            raise PluginError(f"{self.name}: the validation split is empty, so there are no class templates to fit")
        p, predictions = np.exp(log_p), log_p.argmax(1)
        self.classes = np.unique(predictions)
        self.templates = np.stack([p[predictions == k].mean(0) for k in self.classes])

    def state_dict(self) -> dict[str, Any]:
        if self.templates is None:
            raise PluginError(f"{self.name}: state_dict() called before fit()")
        return {"templates": self.templates, "classes": self.classes}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.templates = np.asarray(state["templates"], dtype=np.float64)
        self.classes = np.asarray(state["classes"], dtype=np.int64)

    def score(self, view: SplitView) -> np.ndarray:
        if self.templates is None:
            raise PluginError(f"{self.name}: score() called before fit()")
        log_p = _log_probs(view.logits)
        p = np.exp(log_p)
        log_d = np.log(np.maximum(self.templates, _TINY))
        kl = (p * log_p).sum(1, keepdims=True) - p @ log_d.T  # N x K
        return -kl.min(1)

    def metadata(self) -> dict[str, Any]:
        return {"template_classes": [] if self.classes is None else self.classes.tolist()}
