"""Confidence baselines read off the classifier's logits (Hendrycks & Gimpel, ICLR 2017)."""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax

from oodbench.api import Detector, FitContext, SplitView


class _NothingFitted(Detector):
    """A detector read off the logits as they are: its stored state is empty, so storing it costs nothing."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        pass


class MaxSoftmax(_NothingFitted):
    """Max softmax probability (Hendrycks & Gimpel 2017), the standard baseline.

    score(x) = max_c softmax(f(x))_c, where f(x) are the logits. Higher = more trustworthy.
    Computed as exp(max_c log_softmax) in float64: float32 softmax saturates at 1.0 on
    strong attacks and turns the ranking into ties (see MEASUREMENTS.md).
    Needs: logits only. Fit: nothing.
    """

    name = "msp"

    def score(self, view: SplitView) -> np.ndarray:
        return np.exp(log_softmax(view.logits.astype(np.float64), axis=1).max(1))


class MaxLogit(_NothingFitted):
    """Max logit, the feature-GMM paper's "Logits" baseline.

    score(x) = max_c f(x)_c. Higher = more trustworthy. Needs: logits only. Fit: nothing.
    """

    name = "logits"

    def score(self, view: SplitView) -> np.ndarray:
        return view.logits.astype(np.float64).max(1)
