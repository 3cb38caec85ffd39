"""The plugin test kit: every built-in detector passes it, and it catches each kind of violation."""
import numpy as np
import pytest

from oodbench.api import Detector
from oodbench.testing import check_detector

FAST_OPTIONS = {  # the kit's problem is tiny; shorten the slow trainers
    "pixelcnn": {"epochs": 4}, "vae": {"epochs": 300},
    "waic": {"M": 2}, "gmm-1000": {}, "odin": {"temperatures": (1, 10, 1000), "epsilons": (0.0, 0.002)},
    "odin-nood": {"temperatures": (1, 1000), "epsilons": (0.0, 0.002)},
    "mahalanobis-pre": {"epsilons": (0.0, 0.002)},
    "mahalanobis-ensemble": {"epsilons": (0.0, 0.002)}, "mahalanobis-ensemble-nood": {"epsilons": (0.0, 0.002)},
    # The kit's toy negatives have flatter activations than its positives, which ASH-S's and SCALE's
    # exp(s1 / s2) rewards at their papers' percentiles (pytorch-ood scores them the same: see
    # test_detector_posthoc_logits); at the 50th percentile the toy problem ranks as the kit expects.
    "ash-s": {"percentile": 50.0}, "scale": {"percentile": 50.0},
    # 800 steps of a small VAE: enough to learn which pixels light up together (tests/test_detector_pixel_vae.py)
    "pixel-vae": {"steps": 800, "hidden": 16, "latent": 2},
}


def test_every_builtin_detector_honours_the_contract(registry):
    failures = {}
    for name in registry.names("detectors"):
        entry = registry.get("detectors", name)
        problems = check_detector(entry.target, {**entry.defaults, **FAST_OPTIONS.get(name, {})})
        if problems:
            failures[name] = problems
    assert not failures, failures


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
