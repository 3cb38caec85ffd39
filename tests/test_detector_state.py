"""Fitted detectors as stored artifacts: every built-in round-trips to identical scores, the store never pickles,
and a run whose scores are gone loads the fitted state instead of fitting again."""
import io
import shutil

import numpy as np
import pytest
import torch

from oodbench import hookimpl
from oodbench.api import Detector, PluginError
from oodbench.detector_state import JSON_KEY, from_arrays, to_arrays
from oodbench.leaderboard import results_frame
from oodbench.plugins import build_registry
from oodbench.runner import run_benchmark
from oodbench.testing import check_state_round_trip
from oodbench_plugins.detectors.mahalanobis_ensemble import _fit_regression, _Regression
from test_run import _options

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


# -- the serialiser ---------------------------------------------------------------------
def _through_npz(arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def test_arrays_keep_dtype_and_shape_and_json_values_come_back():
    state = {
        "weights": np.arange(6, dtype=np.float32).reshape(2, 3),
        "scalar": np.array(3, dtype=np.int8),
        "empty": np.zeros((0, 4), dtype=bool),
        "fortran": np.asfortranarray(np.ones((3, 2), dtype=np.complex128)),
        "facts": {"t": 0.1 + 0.2, "nan": float("nan"), "big": 2**70, "name": "ünï", "none": None, "ok": True},
        "grid": (1.0, 2.5),
    }
    back = from_arrays(_through_npz(to_arrays(state)))
    assert back.keys() == state.keys()
    for key in ("weights", "scalar", "empty", "fortran"):
        assert back[key].dtype == state[key].dtype and back[key].shape == state[key].shape
        assert np.array_equal(back[key], state[key])
    facts = back["facts"]
    assert facts["t"] == 0.1 + 0.2 and np.isnan(facts["nan"]) and facts["big"] == 2**70
    assert (facts["name"], facts["none"], facts["ok"]) == ("ünï", None, True)
    assert back["grid"] == [1.0, 2.5], "JSON has no tuples: they come back as lists"
    assert to_arrays(state)[JSON_KEY].dtype.kind == "U" and to_arrays(state)[JSON_KEY].shape == ()


@pytest.mark.parametrize("value, message", [
    (np.array([{"a": 1}], dtype=object), "object arrays need pickle"),
    (np.array(["a", "b"]), "must be numeric or bool"),
    ({1, 2}, "builtins.set is neither"),
    (torch.zeros(2), "convert it to a NumPy array"),
    (np.int64(3), "numpy.int64 is neither"),
    ({"nested": [object()]}, r"\['nested'\]\[0\]: a builtins.object"),
    ({1: "one"}, "dict key 1 is not a str"),
])
def test_the_serialiser_refuses_what_needs_pickle(value, message):
    with pytest.raises(PluginError, match=r"'culprit'\]") as error:
        to_arrays({"fine": np.ones(2), "culprit": value}, "toy")
    assert error.match(message)


def test_the_reserved_key_is_refused():
    with pytest.raises(PluginError, match="reserved"):
        to_arrays({JSON_KEY: 1})


# -- the engine -------------------------------------------------------------------------
class CountingFits(Detector):
    """Max logit minus the median training max logit; counts its fits, so a test sees whether a run refitted."""

    name = "counting"
    fits = 0

    def fit(self, ctx):
        type(self).fits += 1
        self.offset = float(np.median(ctx.train.logits.max(1)))

    def score(self, view):
        return view.logits.max(1).astype(np.float64) - self.offset

    def state_dict(self):
        return {"offset": self.offset}

    def load_state_dict(self, state, ctx=None):
        self.offset = float(state["offset"])


class Counting:
    @hookimpl
    def oodbench_register_detectors(self, register):
        register(CountingFits)


def test_a_run_without_scores_loads_the_fitted_state_instead_of_fitting(shared_cache, tmp_path):
    registry = build_registry(extra_plugins=[Counting()], strict=True)
    detectors = "counting,mahalanobis-pre[epsilons=(0.0,0.002)]"
    fits = CountingFits.fits
    first = run_benchmark(_options(registry, detectors, shared_cache, executor="inline"), registry)
    assert CountingFits.fits == fits + 1
    cache = tmp_path / "cache"
    shutil.copytree(shared_cache, cache)  # the trained classifier and its outputs come along
    shutil.rmtree(cache / "scores")
    assert len(list((cache / "fitted").glob("fitted-*.npz"))) >= 2
    second = run_benchmark(_options(registry, detectors, cache, executor="inline"), registry)
    assert CountingFits.fits == fits + 1, "the second run fitted again instead of loading the stored state"
    assert results_frame(second.rows).equals(results_frame(first.rows))
    assert (results_frame(second.rows)["status"] == "ok").all()
