"""Temperature scaling (Guo, Pleiss, Sun & Weinberger, ICML 2017) as a confidence score."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, logsumexp

from oodbench.api import Detector, FitContext, PluginError, SplitView

from .odin import max_softmax

#: The temperature search range: wide enough for any trained network, bounded so that a
#: validation set the classifier gets all right (NLL keeps falling as T -> 0) still ends.
T_BOUNDS = (1e-3, 1e3)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / T), float64."""
    z = np.asarray(logits, np.float64) / temperature
    return float(np.mean(logsumexp(z, axis=1) - z[np.arange(len(z)), labels]))


def expected_calibration_error(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = 10) -> float:
    """ECE (Guo et al. 2017): sum_b |B_b|/N |acc(B_b) - conf(B_b)|, equal-width bins (b/B, (b+1)/B].

    Confidence = max softmax(logits / T), correctness = argmax == label.
    """
    log_probs = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    confidence = np.exp(log_probs.max(1))
    correct = (log_probs.argmax(1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    gap = np.bincount(which, correct - confidence, minlength=bins)  # sum of (correct - conf) per bin
    return float(np.abs(gap).sum() / len(confidence))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, maxiter: int = 100) -> tuple[float, Any]:
    """T minimising the NLL, by L-BFGS-B on log T (exact gradient, float64, ``maxiter`` iterations)."""
    z = np.asarray(logits, np.float64)
    picked = z[np.arange(len(z)), labels]

    def objective(log_t: np.ndarray) -> tuple[float, np.ndarray]:
        t = math.exp(log_t[0])
        log_probs = log_softmax(z / t, axis=1)
        value = float(np.mean(-log_probs[np.arange(len(z)), labels]))
        expected_logit = (np.exp(log_probs) * z).sum(1)
        # d NLL / d log T = T * d NLL / d T = mean(z_y - E_p[z]) / T
        return value, np.array([np.mean(picked - expected_logit) / t])

    bounds = [(math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1]))]
    result = minimize(objective, np.zeros(1), jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": maxiter})
    return math.exp(result.x[0]), result


class TemperatureScaling(Detector):
    """Max softmax after temperature scaling fit on validation NLL (Guo et al. 2017).

    Guo, Pleiss, Sun & Weinberger, "On calibration of modern neural networks", ICML 2017;
    used as a baseline by the feature-GMM paper, whose appendix fixes the fit: L-BFGS-B, at
    most 100 iterations, ECE with 10 bins. ``fit`` finds T > 0 minimising the mean NLL of
    the in-distribution *validation* labels under softmax(logits / T) (L-BFGS-B on log T,
    float64, exact gradient, start T = 1, T kept in [1e-3, 1e3]). Score, higher = more
    trustworthy:  max_c softmax(f(x) / T)_c, computed as exp(max log_softmax) in float64.
    ``metadata`` records T and the validation NLL and ECE (``ece_bins`` equal-width bins)
    before and after scaling. Needs: logits, labels (of the validation split).
    Options: ``maxiter`` = 100, ``ece_bins`` = 10.
    """

    name = "temperature"
    needs = frozenset({"logits", "labels"})

    def __init__(self, *, maxiter: int = 100, ece_bins: int = 10):
        if maxiter < 1 or ece_bins < 1:
            raise PluginError(f"{self.name}: maxiter and ece_bins must be >= 1")
        self.maxiter = maxiter
        self.ece_bins = ece_bins
        self.temperature: float | None = None
        self._facts: dict[str, Any] = {}

    def fit(self, ctx: FitContext) -> None:
        logits, labels = ctx.val.logits.astype(np.float64), np.asarray(ctx.val.labels)
        if not len(logits):
            raise PluginError(f"{self.name}: the validation split is empty")
        self.temperature, result = fit_temperature(logits, labels, self.maxiter)
        self._facts = {
            "temperature": self.temperature,
            "iterations": int(result.nit),
            "converged": bool(result.success),
            "val_nll_before": nll(logits, labels, 1.0),
            "val_nll_after": nll(logits, labels, self.temperature),
            "val_ece_before": expected_calibration_error(logits, labels, 1.0, self.ece_bins),
            "val_ece_after": expected_calibration_error(logits, labels, self.temperature, self.ece_bins),
        }

    def state_dict(self) -> dict[str, Any]:
        if self.temperature is None:
            raise PluginError(f"{self.name}: call fit() before state_dict()")
        return {"temperature": self.temperature, "facts": dict(self._facts)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.temperature = float(state["temperature"])  # JSON keeps a float's every bit (it writes repr)
        self._facts = dict(state["facts"])

    def score(self, view: SplitView) -> np.ndarray:
        if self.temperature is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        return max_softmax(view.logits, self.temperature)

    def metadata(self) -> dict[str, Any]:
        return dict(self._facts)
