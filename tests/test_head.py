"""Head access: every built-in network's final layer reproduces its logits, and a ReAct written against
the contract alone (``needs = {"features", "head"}``, ``ctx.model.head``) is the energy score at
percentile 100, passes the test kit and runs in a benchmark (the fake one, whose network has a linear head)."""
import warnings

import numpy as np
import pytest
import torch
from fake_plugins import fake_options, fake_registry
from scipy.special import logsumexp

from oodbench import hookimpl
from oodbench.api import Detector, FitContext, ImageSet, PluginError, SplitView
from oodbench.classifier import ClassifierHandle
from oodbench.leaderboard import results_frame
from oodbench.plugins import instantiate
from oodbench.runner import run_benchmark
from oodbench.testing import check_detector
from oodbench_plugins.models.cifar_resnet import CifarResNetNetwork

CLASSES = 5


class ReAct(Detector):
    """ReAct: energy of the logits recomputed from penultimate features clipped at the p-th percentile.

    Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations", NeurIPS
    2021: c = the ``percentile``-th percentile of all penultimate activations of the
    in-distribution training split, logits = head(min(h, c)), score = logsumexp(logits) (the
    negative energy); higher = more trustworthy.
    """

    name = "react-test"
    needs = frozenset({"features", "head"})

    def __init__(self, *, percentile: float = 90.0):
        if not 0 < percentile <= 100:
            raise ValueError(f"react: percentile must be in (0, 100], got {percentile}")
        self.percentile = percentile

    def fit(self, ctx):
        self.model = ctx.model
        self.threshold = float(np.percentile(ctx.train.features, self.percentile))

    def score(self, view):
        logits = self.model.head(np.minimum(view.features, self.threshold))
        return logsumexp(logits.astype(np.float64), axis=1)

    def metadata(self):
        return {"threshold": self.threshold}

    def state_dict(self):
        return {"threshold": self.threshold}

    def load_state_dict(self, state, ctx=None):
        if ctx is None or ctx.model is None:
            raise PluginError("react needs the classifier's head to score")
        self.model, self.threshold = ctx.model, float(state["threshold"])


class ReActPlugin:
    @hookimpl
    def oodbench_register_detectors(self, register):
        register(ReAct)


def _networks(registry):
    """Every built-in network, small, random weights, eval mode; (name, network, image shape)."""
    torch.manual_seed(0)
    built = [
        ("small-cnn", instantiate(registry.get("models", "small-cnn"), {"width": 4}).build((1, 8, 8), CLASSES, 0),
         (1, 8, 8)),
        ("mlp", instantiate(registry.get("models", "mlp"), {"hidden": 16, "layers": 2}).build((1, 8, 8), CLASSES, 0),
         (1, 8, 8)),
        ("cifar-resnet", CifarResNetNetwork(1, 3, CLASSES, (0.5,) * 3, (0.25,) * 3), (3, 16, 16)),
        ("densenet-bc", instantiate(registry.get("models", "densenet-bc"), {"depth": 10, "growth_rate": 4})
         .build((3, 16, 16), CLASSES, 0), (3, 16, 16)),
        ("wide-resnet", instantiate(registry.get("models", "wide-resnet"), {"depth": 10, "widen_factor": 1})
         .build((3, 16, 16), CLASSES, 0), (3, 16, 16)),
    ]
    for _, network, _ in built:
        with torch.no_grad():  # a bias far from zero, so a head that drops it is caught
            network.head.bias.copy_(torch.linspace(-1, 1, CLASSES))
    return [(name, network.eval(), shape) for name, network, shape in built]


def _view(name, handle, images, allowed=frozenset({"logits", "features", "head"})):
    logits, features = handle.outputs(torch.from_numpy(images))
    return SplitView(name, logits.numpy(), features.numpy(), ImageSet(images, None, name, CLASSES), None, allowed)


@pytest.fixture(scope="module")
def networks(registry):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threads cost more than they save on a busy machine
    yield _networks(registry)
    torch.set_num_threads(threads)


def test_every_builtin_head_reproduces_the_logits_from_the_penultimate_features(networks):
    images = np.random.default_rng(0).random((10, 3, 16, 16), dtype=np.float32)
    for name, network, shape in networks:
        handle = ClassifierHandle(network, torch.device("cpu"), batch_size=4)  # several head batches
        x = np.ascontiguousarray(images[:, :shape[0], :shape[1], :shape[2]])
        view = _view(name, handle, x)
        assert handle.has_head, name
        before = {k: dict(v) for k, v in handle.passes.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # read-only view arrays go in without a torch warning
            logits = handle.head(view.features)
        assert logits.dtype == np.float32 and logits.shape == (10, CLASSES), name
        np.testing.assert_allclose(logits, view.logits, rtol=1e-5, atol=1e-5, err_msg=name)
        assert handle.passes == before, f"{name}: head evaluations are not network passes"
        weight, bias = handle.head_weight_bias()
        assert weight.dtype == bias.dtype == np.float64 and weight.shape == (CLASSES, view.features.shape[1])
        np.testing.assert_allclose(view.features.astype(np.float64) @ weight.T + bias, view.logits,
                                   rtol=1e-5, atol=1e-5, err_msg=name)
        assert handle.head(np.zeros((0, weight.shape[1]), np.float32)).shape == (0, CLASSES)
        with handle.float64():
            logits64, features64 = handle.outputs(torch.from_numpy(x))
            np.testing.assert_allclose(handle.head(features64), logits64, rtol=1e-6, atol=1e-6, err_msg=name)


def test_a_network_without_a_head_is_named():
    class Headless(torch.nn.Module):
        def forward_features(self, x):
            return x.flatten(1), x.flatten(1)

    handle = ClassifierHandle(Headless(), torch.device("cpu"))
    assert not handle.has_head
    for call in (lambda: handle.head(np.zeros((2, 3), np.float32)), handle.head_weight_bias):
        with pytest.raises(PluginError, match=r"classifier \(Headless\) exposes no head"):
            call()


def test_a_head_that_is_not_affine_has_no_weight_and_bias():
    class Deep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))

        def forward_features(self, x):
            return self.head(x.flatten(1)), x.flatten(1)

    handle = ClassifierHandle(Deep(), torch.device("cpu"))
    x = torch.rand(3, 1, 2, 2)
    assert handle.head_weight_bias() is None
    np.testing.assert_allclose(handle.head(x.flatten(1)), handle.logits(x).numpy(), rtol=1e-6)


def test_react_at_percentile_100_is_the_energy_and_clips_below(networks):
    _, network, shape = networks[0]  # small-cnn: ReLU features, so clipping at the 90th percentile bites
    handle = ClassifierHandle(network, torch.device("cpu"), batch_size=16)
    rng = np.random.default_rng(1)
    train = _view("train", handle, rng.random((40, *shape), dtype=np.float32))
    val = _view("val", handle, rng.random((10, *shape), dtype=np.float32))
    ctx = FitContext(train, val, CLASSES, 0, torch.device("cpu"), handle)
    energy = logsumexp(train.logits.astype(np.float64), axis=1)

    full = ReAct(percentile=100)
    full.fit(ctx)
    assert full.threshold == train.features.max()  # nothing on the fit split is clipped
    np.testing.assert_allclose(full.score(train), energy, rtol=0, atol=1e-5)

    clipped = ReAct(percentile=90)
    clipped.fit(ctx)
    scores = clipped.score(train)
    assert not np.allclose(scores, energy, rtol=0, atol=1e-3)
    weight, bias = handle.head_weight_bias()  # the same in closed form
    expected = logsumexp(np.minimum(train.features.astype(np.float64), clipped.threshold) @ weight.T + bias, axis=1)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)


def test_react_passes_the_test_kit():
    assert check_detector(ReAct) == []
    assert check_detector(ReAct, {"percentile": 100}) == []


def test_react_runs_on_a_third_party_network_with_a_head(shared_cache):
    """The fake benchmark's network (``fake_plugins/``) exposes its linear head as a third party's would."""
    registry = fake_registry(ReActPlugin())
    frame = results_frame(run_benchmark(fake_options(registry, "react-test", shared_cache, executor="inline"),
                                        registry).rows)
    assert len(frame) == 4 and (frame["status"] == "ok").all(), frame[frame["status"] != "ok"]["error"].unique()
    assert frame["auroc"].notna().all()
