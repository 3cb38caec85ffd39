"""The built-in detectors' fits as stored artifacts: each round-trips to identical scores (``oodbench.testing``'s
check), in its variants too, and one that needs the classifier says so when loaded without it. The store's serialiser
and the engine's use of stored fits are the core's (``tests/test_detector_state.py``)."""
import numpy as np
import pytest

from oodbench.api import PluginError
from oodbench.testing import check_state_round_trip
from oodbench_plugins.detectors.mahalanobis_ensemble import _fit_regression, _Regression

#: Options small enough for one fit and one load in about a second; a round trip needs no good detector.
TINY = {
    "vae": {"epochs": 2, "hidden": 16, "latent": 4},
    "maf": {"epochs": 2, "hidden": 16, "layers": 2},
    "pixelcnn": {"epochs": 1, "nr_filters": 8},
    "pixel-vae": {"steps": 20, "hidden": 16, "latent": 2},
    "waic": {"M": 2, "member_options": {"k": 2}},
    "odin": {"temperatures": (1, 1000), "epsilons": (0.0, 0.002)},
    "odin-nood": {"temperatures": (1, 1000), "epsilons": (0.0, 0.002)},
    "mahalanobis-pre": {"epsilons": (0.0, 0.002)},
    "mahalanobis-ensemble": {"epsilons": (0.0, 0.002)},
    "mahalanobis-ensemble-nood": {"epsilons": (0.0, 0.002)},
}
#: Variants whose state has parts the defaults leave out.
VARIANTS = {
    "maf with batch norm": ("maf", {"epochs": 2, "hidden": 16, "layers": 2, "batch_norm": True}),
    "waic of VAEs": ("waic", {"M": 2, "member": "vae", "member_options": {"epochs": 1, "hidden": 8, "latent": 2}}),
    "waic of pixel VAEs": ("waic", {"M": 2, "member": "pixel-vae", "member_options": {"steps": 5, "hidden": 8,
                                                                                     "latent": 2}}),
    "gmm in float64": ("gmm", {"k": 3, "dtype": "float64"}),
}
BUILTIN = ["ash-b", "ash-p", "ash-s", "dice", "energy", "entropy", "fdbd", "gen", "gmm", "gmm-100", "gmm-1000",
           "gradnorm", "kl-matching", "knn", "logits", "maf", "mahalanobis", "mahalanobis-ensemble",
           "mahalanobis-ensemble-nood", "mahalanobis-pre", "maxlogit", "msp", "nci", "nnguide", "odin", "odin-nood",
           "pixel-vae", "pixelcnn", "react", "rmds", "scale", "she", "temperature", "vae", "vim", "waic", "zheng"]


def test_every_builtin_detector_stores_its_state(registry):
    builtin = [n for n in registry.names("detectors") if registry.get("detectors", n).provider == "oodbench"]
    assert sorted(builtin) == BUILTIN, "a new built-in detector: add it to BUILTIN (and to TINY if it trains)"
    assert [n for n in BUILTIN if not registry.get("detectors", n).target.stores_state()] == []


@pytest.mark.parametrize("name", BUILTIN)
def test_a_stored_fit_scores_exactly_as_the_fit(registry, name):
    entry = registry.get("detectors", name)
    assert check_state_round_trip(entry.target, {**entry.defaults, **TINY.get(name, {})}) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_stored_fit_scores_exactly_as_the_fit_in_variants(registry, variant):
    name, options = VARIANTS[variant]
    assert check_state_round_trip(registry.get("detectors", name).target, options) == []


def test_gradient_detectors_need_the_classifier_to_load(registry):
    odin = registry.get("detectors", "odin").target()
    with pytest.raises(PluginError, match="needs the classifier"):
        odin.load_state_dict(odin.state_dict())


def test_the_stored_regression_scores_as_scikit_learn_to_the_bit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3)) * [1.0, 100.0, 0.01]
    y = (x[:, 0] + rng.normal(size=80) > 0).astype(float)
    pipeline = _fit_regression(x, y)
    test = rng.normal(size=(500, 3)) * [1.0, 100.0, 0.01]
    assert np.array_equal(_Regression.of(pipeline).decision_function(test), pipeline.decision_function(test))
