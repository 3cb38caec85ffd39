"""The plugin test kit: well-behaved third-party detectors pass it, and it catches each kind of violation."""
import numpy as np
import pytest

from oodbench.api import Detector
from oodbench.testing import check_detector


def test_well_behaved_third_party_detectors_pass(fakes):
    """The fake benchmark's detectors (``fake_plugins/``), one of them fitted, one needing gradients: no false alarm.
    Every built-in detector passes too: plugins/tests/test_builtin_detector_contract.py."""
    names = ["fake-confidence", "fake-centroid", "fake-gradnorm"]
    assert {fakes.get("detectors", n).provider for n in names} == {"FakeClassifier"}
    assert {n: check_detector(fakes.get("detectors", n).target) for n in names} == {n: [] for n in names}


class Inverted(Detector):
    """Scores confident inputs low."""

    name = "inverted"

    def score(self, view):
        return -view.logits.max(1)


class Random(Detector):
    """Unseeded noise."""

    name = "random"

    def score(self, view):
        return np.random.default_rng().normal(size=len(view))


class WrongShape(Detector):
    """One score too many."""

    name = "wrong-shape"

    def score(self, view):
        return np.zeros(len(view) + 1)


class Sneaky(Detector):
    """Reads labels in fit without declaring them."""

    name = "sneaky"

    def fit(self, ctx):
        self.prior = np.bincount(ctx.train.labels)

    def score(self, view):
        return view.logits.max(1)


class NaNs(Detector):
    """NaN on everything."""

    name = "nans"

    def score(self, view):
        return np.full(len(view), np.nan)


class Forgetful(Detector):
    """Stores its state but does not load it back."""

    name = "forgetful"
    offset = 0.0

    def fit(self, ctx):
        self.offset = float(ctx.train.logits.max())

    def score(self, view):
        return view.logits.max(1) - self.offset

    def state_dict(self):
        return {"offset": self.offset}

    def load_state_dict(self, state, ctx=None):
        pass


class Pickler(Forgetful):
    """Stores a Python object that only pickle could write."""

    name = "pickler"

    def state_dict(self):
        return {"offset": self.offset, "fitted_on": object()}


class HalfStored(Forgetful):
    """Implements state_dict without load_state_dict."""

    name = "half-stored"
    load_state_dict = Detector.load_state_dict


@pytest.mark.parametrize("cls, message", [
    (Inverted, "scores look inverted"),
    (Random, "not deterministic"),
    (WrongShape, "returned shape (65,)"),
    (Sneaky, "read 'labels' of train without declaring it"),
    (NaNs, "non-finite values"),
    (Forgetful, "load_state_dict does not restore the fit"),
    (Pickler, "'fitted_on']: a builtins.object is neither a numeric array nor JSON"),
    (HalfStored, "implements only one of state_dict and load_state_dict"),
])
def test_the_kit_catches(cls, message):
    problems = check_detector(cls)
    assert any(message in p for p in problems), problems
