import numpy as np
import pytest
from scipy.special import logsumexp

from oodbench.api import ImageSet, SplitView
from oodbench.testing import assert_detector_contract

from oodbench_energy import Energy


def test_contract():
    assert_detector_contract(Energy)


def test_energy_is_logsumexp_and_large_temperature_tends_to_mean_logit_plus_log_c():
    logits = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]], np.float32)
    view = SplitView("x", logits, logits, ImageSet(np.zeros((2, 1, 1, 1), np.uint8)))
    assert Energy().score(view) == pytest.approx(logsumexp(logits.astype(float), axis=1))
    # T -> inf: T logsumexp(f/T) = T log C + mean(f) + O(1/T)
    t = 1e4
    assert Energy(temperature=t).score(view) - t * np.log(3) == pytest.approx(logits.mean(1), abs=1e-3)
