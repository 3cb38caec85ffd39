"""Fitted detectors as stored artifacts: the store never pickles, and a run whose scores are gone loads the fitted
state instead of fitting again. Every built-in's round trip: plugins/tests/test_builtin_detector_state.py."""
import io
import shutil

import numpy as np
import pytest
import torch
from fake_plugins import fake_options, fake_registry

from oodbench import hookimpl
from oodbench.api import Detector, PluginError
from oodbench.detector_state import JSON_KEY, from_arrays, to_arrays
from oodbench.leaderboard import results_frame
from oodbench.runner import run_benchmark


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
    """fake-gradnorm's state loads only with the classifier (as ODIN's and Mahalanobis's preprocessing do)."""
    registry = fake_registry(Counting())
    detectors = "counting,fake-gradnorm"
    fits = CountingFits.fits
    first = run_benchmark(fake_options(registry, detectors, shared_cache, executor="inline"), registry)
    assert CountingFits.fits == fits + 1
    cache = tmp_path / "cache"
    shutil.copytree(shared_cache, cache)  # the trained classifier and its outputs come along
    shutil.rmtree(cache / "scores")
    assert len(list((cache / "fitted").glob("fitted-*.npz"))) >= 2
    second = run_benchmark(fake_options(registry, detectors, cache, executor="inline"), registry)
    assert CountingFits.fits == fits + 1, "the second run fitted again instead of loading the stored state"
    assert results_frame(second.rows).equals(results_frame(first.rows))
    assert (results_frame(second.rows)["status"] == "ok").all()
