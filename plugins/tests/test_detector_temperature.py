"""Known-answer tests for temperature scaling: recovery of a known T, exact NLL optimum, hand ECE."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from scipy.special import softmax

from oodbench.api import FitContext, ImageSet, SplitView
from oodbench_plugins.detectors.temperature import TemperatureScaling, expected_calibration_error, nll


def logits_view(logits: np.ndarray, labels: np.ndarray | None = None) -> SplitView:
    images = ImageSet(np.zeros((len(logits), 1, 1, 1), np.float32))
    return SplitView("v", logits.astype(np.float32), np.zeros((len(logits), 1), np.float32), images, labels,
                     TemperatureScaling.needs)


def calibrated_at(true_t: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z / T*): T* is the calibrating temperature."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, (n, 10)).astype(np.float32).astype(np.float64)
    p = softmax(z / true_t, axis=1)
    labels = (p.cumsum(1) < rng.uniform(size=(n, 1))).sum(1)
    return z, np.minimum(labels, 9)


@pytest.mark.parametrize("true_t", [2.5, 0.6])  # over- and under-confident logits
def test_recovers_known_temperature(true_t):
    z, labels = calibrated_at(true_t, 20000, seed=int(true_t * 10))
    val = logits_view(z, labels)
    detector = TemperatureScaling()
    detector.fit(FitContext(val, val, 10, 0, torch.device("cpu")))
    assert detector.temperature == pytest.approx(true_t, rel=0.05)
    # It is the NLL minimiser to optimiser precision (independent 1-d search).
    reference = minimize_scalar(lambda t: nll(z, labels, t), bounds=(0.1, 10), method="bounded",
                                options={"xatol": 1e-9}).x
    assert detector.temperature == pytest.approx(reference, rel=1e-4)
    facts = detector.metadata()
    expected_nll = torch.nn.functional.cross_entropy(torch.from_numpy(z / detector.temperature), torch.from_numpy(labels))
    assert facts["val_nll_after"] == pytest.approx(float(expected_nll), rel=1e-12)
    assert facts["val_nll_after"] < facts["val_nll_before"]
    assert facts["val_ece_after"] < facts["val_ece_before"]
    assert facts["converged"] and facts["iterations"] <= 100
    test = logits_view(z[:50])
    np.testing.assert_allclose(detector.score(test), softmax(z[:50] / detector.temperature, axis=1).max(1), rtol=1e-12)


def test_ece_matches_hand_computation():
    confidence = np.array([0.95, 0.95, 0.85, 0.62, 0.55])
    logits = np.log(np.c_[confidence, 1 - confidence])  # softmax gives back the confidences
    labels = np.array([0, 1, 0, 0, 1])  # correct, wrong, correct, correct, wrong
    # Bins (0.9, 1]: 2 inputs, acc 0.5, conf 0.95; (0.8, 0.9]: acc 1, conf 0.85;
    # (0.6, 0.7]: acc 1, conf 0.62; (0.5, 0.6]: acc 0, conf 0.55.
    by_hand = 2 / 5 * 0.45 + 1 / 5 * 0.15 + 1 / 5 * 0.38 + 1 / 5 * 0.55
    assert expected_calibration_error(logits, labels, bins=10) == pytest.approx(by_hand, abs=1e-12)
    # With 2 bins, (0.5, 1] holds everything: |acc 3/5 - mean conf 0.784|.
    assert expected_calibration_error(logits, labels, bins=2) == pytest.approx(abs(0.6 - 0.784), abs=1e-12)
    # Temperature applies before binning: T = 1e6 puts every confidence just above 0.5, one bin.
    assert expected_calibration_error(logits, labels, 1e6, bins=10) == pytest.approx(abs(0.6 - 0.5), abs=1e-6)
