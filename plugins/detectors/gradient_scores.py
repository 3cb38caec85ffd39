"""Scores from the gradients of the classifier's last layer, in closed form where the head is affine."""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy.special import softmax

from oodbench.api import Detector, FitContext, PluginError, SplitView


class GradNorm(Detector):
    """GradNorm (Huang et al. 2021): L1 norm of the last layer's weight gradient of KL(uniform || softmax).

    Paper: Huang, Geng & Li, "On the Importance of Gradients for Detecting Distributional Shifts
    in the Wild", NeurIPS 2021: S(x) = || d D_KL(u || softmax(f(x) / T)) / dW ||_1 for the weights
    W of the last (fully connected) layer, u the uniform distribution over the C classes;
    in-distribution inputs have larger norms.
    Closed form: with an affine head z = W h + b, p = softmax(z / T) and
    D_KL(u || p) = -log C - (1/C) sum_c log p_c, the gradient with respect to the logits is
    (p - u) / T, and with respect to W it is the outer product (p - u) h^T / T. The L1 norm of an
    outer product is the product of the L1 norms, so
    S(x) = ||p - u||_1 * ||h||_1 / T = (sum_c |p_c - 1/C|) (sum_j |h_j|) / T,
    computed from the view's logits and penultimate features in float64: no network pass.
    Score: S(x) itself. Higher = more trustworthy.
    Needs: logits, features, head (the head must be affine, an ``nn.Linear``, for the closed form
    to be the gradient of its weight; else the fit fails with a PluginError). Fit: nothing.
    Options: temperature=1.0 (T), as the authors' code runs it.
    Deviation: the authors' code differentiates sum_c -log p_c (targets of ones, not 1/C), i.e.
    C times the KL divergence, so its scores are C times these: the same ranking, and the same
    metrics. Like the authors' code, only the weight's gradient counts, not the bias's.
    pytorch-ood's ``GradNorm`` (restricted to the last layer's weight) returns -S(x).
    """

    name = "gradnorm"
    needs = frozenset({"logits", "features", "head"})

    def __init__(self, *, temperature: Annotated[float, Field(gt=0)] = 1.0):
        self.temperature = temperature
        self._fitted = False

    def _check_head(self, ctx: FitContext | None) -> None:
        if ctx is None or ctx.model is None:
            raise PluginError(f"{self.name} needs the classifier's head (ctx.model) to check that it is affine")
        if ctx.model.head_weight_bias() is None:
            raise PluginError(f"{self.name} takes the gradient of the last layer's weight in closed form, which needs "
                              "an affine head (an nn.Linear); this classifier's head is not affine")
        self._fitted = True

    def fit(self, ctx: FitContext) -> None:
        self._check_head(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._check_head(ctx)

    def score(self, view: SplitView) -> np.ndarray:
        if not self._fitted:
            raise PluginError(f"{self.name}: score() called before fit()")
        logits = view.logits.astype(np.float64)
        p = softmax(logits / float(self.temperature), axis=1)
        uniform = 1.0 / logits.shape[1]
        return np.abs(p - uniform).sum(1) * np.abs(view.features.astype(np.float64)).sum(1) / float(self.temperature)
