"""Known-answer tests for ODIN: MSP identity, closed-form perturbation, exact grid choice, pass counts."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.linalg import null_space
from scipy.special import log_softmax, softmax
from sklearn.metrics import roc_curve

from oodbench.api import FitContext, Holdout, ImageSet, SplitView
from oodbench.classifier import ClassifierHandle
from oodbench_plugins.detectors.odin import Odin, OdinNoOOD, fgsm, odin_direction, odin_scores
from oodbench_plugins.detectors.softmax import MaxSoftmax

SHAPE = (1, 4, 4)
CLASSES = 3


class LinearNet(torch.nn.Module):
    """logits = W vec(x) + b: every input gradient has a closed form."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(int(np.prod(SHAPE)), CLASSES)
        with torch.no_grad():
            self.fc.weight.mul_(8.0)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = x.flatten(1)
        return self.fc(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

    def numpy(self) -> tuple[np.ndarray, np.ndarray]:
        return self.fc.weight.detach().double().numpy(), self.fc.bias.detach().double().numpy()


def handle(batch_size: int = 512) -> ClassifierHandle:
    return ClassifierHandle(LinearNet(), torch.device("cpu"), batch_size=batch_size)


def images(n: int, low: float, high: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(low, high, (n, *SHAPE)).astype(np.float32)


def view(model: ClassifierHandle, x: np.ndarray, allowed: frozenset[str], labels: np.ndarray | None = None) -> SplitView:
    logits, feats = model.outputs(torch.from_numpy(x))
    model.passes.clear()
    return SplitView("v", logits.numpy(), feats.numpy(), ImageSet(x), labels, allowed)


def closed_form_perturbed(net: LinearNet, x: np.ndarray, temperature: float, epsilon: float) -> np.ndarray:
    """x - eps * sign(-grad log S_yhat(x; T)), with grad = W^T (e_yhat - softmax(f/T)) / T."""
    w, b = net.numpy()
    flat = x.reshape(len(x), -1).astype(np.float64)
    logits = flat @ w.T + b
    onehot = np.eye(CLASSES)[logits.argmax(1)]
    grad = (onehot - softmax(logits / temperature, axis=1)) @ w / temperature
    return (flat - epsilon * np.sign(-grad)).reshape(x.shape), grad.reshape(x.shape)


def closed_form_score(net: LinearNet, x: np.ndarray, temperature: float, epsilon: float) -> np.ndarray:
    w, b = net.numpy()
    perturbed = closed_form_perturbed(net, x, temperature, epsilon)[0].reshape(len(x), -1)
    return np.exp(log_softmax((perturbed @ w.T + b) / temperature, axis=1).max(1))


def sklearn_fpr95(pos: np.ndarray, neg: np.ndarray) -> float:
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    fpr, tpr, _ = roc_curve(y, np.r_[pos, neg], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95 - 1e-12)])


def test_t1_eps0_equals_msp():
    model = handle()
    x = images(50, 0.0, 1.0, seed=1)
    v = view(model, x, MaxSoftmax.needs | Odin.needs)
    msp = MaxSoftmax().score(v)
    through_network = odin_scores(model, torch.from_numpy(x), temperature=1.0, epsilon=0.0)
    np.testing.assert_allclose(through_network, msp, rtol=1e-12, atol=0)
    detector = Odin(temperature=1.0, epsilon=0.0)
    detector.fit(FitContext(v, v, CLASSES, 0, torch.device("cpu"), model))
    np.testing.assert_allclose(detector.score(v), msp, rtol=1e-12, atol=0)


@pytest.mark.parametrize("temperature", [1.0, 10.0, 1000.0])
def test_perturbation_matches_closed_form(temperature):
    model = handle()
    x = images(40, 0.0, 1.0, seed=2)
    epsilon = 0.003
    expected, grad = closed_form_perturbed(model.network, x, temperature, epsilon)
    direction = odin_direction(model, torch.from_numpy(x), temperature).numpy()
    clear = np.abs(grad) > 1e-6 * np.abs(grad).max()  # float32 cannot settle signs of near-zero components
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(direction[clear], np.sign(grad)[clear])
    np.testing.assert_allclose((x + epsilon * direction)[clear], expected[clear], rtol=0, atol=1e-6)
    # Not clipped to [0, 1], as in the paper and the authors' code.
    assert ((x + epsilon * direction) > 1.0).any() or ((x + epsilon * direction) < 0.0).any()


def test_score_matches_closed_form():
    model = handle()
    x = images(40, 0.0, 1.0, seed=3)
    v = view(model, x, Odin.needs)
    detector = Odin(temperature=5.0, epsilon=0.02)
    detector.fit(FitContext(v, v, CLASSES, 0, torch.device("cpu"), model))
    expected = closed_form_score(model.network, x, 5.0, 0.02)
    np.testing.assert_allclose(detector.score(v), expected, rtol=1e-5)
    # The perturbation raises every score (first-order ascent on log S for a linear model).
    assert (expected > closed_form_score(model.network, x, 5.0, 0.0)).all()


def with_logits(net: LinearNet, logits: np.ndarray, seed: int) -> np.ndarray:
    """Images whose logits under ``net`` are ``logits``, plus random pixels the network ignores."""
    w, b = net.numpy()
    noise = np.random.default_rng(seed).normal(0, 0.2, (len(logits), w.shape[1] - CLASSES)) @ null_space(w).T
    return ((logits - b) @ np.linalg.pinv(w).T + noise + 0.5).reshape(len(logits), *SHAPE).astype(np.float32)


@pytest.mark.parametrize("temperatures, expected", [
    ((1.0, 2.0, 10.0, 100.0), (100.0, 0.0)),  # four points tie at FPR 0: smallest eps wins
    ((10.0, 2.0, 1.0), (10.0, 0.1)),  # here eps decides
])
def test_tune_picks_brute_force_minimiser(temperatures, expected):
    model = handle()
    rng = np.random.default_rng(0)
    # Positives: a confident top class but a close runner-up; negatives: one class ahead of two
    # tied ones. Low T ranks by margin, high T by max minus mean logit, so T matters.
    top, gap = rng.uniform(2, 6, 100), rng.uniform(0.2, 2, 100)
    pos = with_logits(model.network, np.c_[top, top - gap, np.full(100, -8.0)], seed=1)
    neg_top = rng.uniform(1, 9, 100)
    neg = with_logits(model.network, np.c_[neg_top, np.zeros((100, 2))] + rng.normal(0, 0.3, (100, 3)), seed=2)
    epsilons = (0.1, 0.0, 0.05, 0.01)  # unsorted on purpose
    fprs = {
        (t, e): sklearn_fpr95(closed_form_score(model.network, pos, t, e), closed_form_score(model.network, neg, t, e))
        for t, e in itertools.product(temperatures, epsilons)
    }
    best = min(sorted(fprs), key=lambda k: fprs[k])  # sorted: ties go to the smallest T, then eps
    assert best == expected, "the data no longer exercise what this test is about"
    detector = Odin(temperatures=temperatures, epsilons=epsilons)
    dummy = view(model, pos, Odin.needs)
    detector.fit(FitContext(dummy, dummy, CLASSES, 0, torch.device("cpu"), model))
    choice = detector.tune(Holdout("src", view(model, pos, Odin.needs), view(model, neg, Odin.needs)))
    assert (choice["temperature"], choice["epsilon"]) == best
    assert choice["holdout_fpr95"] == pytest.approx(fprs[best], abs=1e-12)
    # the same choice although logits were reused where an image's gradient sign repeats across T
    assert 200 < choice["grid_directions"] < 200 * len(temperatures)


def test_pass_counts_share_the_gradient_across_epsilons():
    model = handle(batch_size=16)
    pos, neg = images(30, 0.0, 1.0, seed=8), images(20, 0.2, 0.8, seed=9)
    n, temperatures, epsilons = 50, (1.0, 10.0, 100.0), (0.0, 0.001, 0.002, 0.004)
    detector = Odin(temperatures=temperatures, epsilons=epsilons)
    holdout = Holdout("src", view(model, pos, Odin.needs), view(model, neg, Odin.needs))
    detector.fit(FitContext(holdout.positives, holdout.positives, CLASSES, 0, torch.device("cpu"), model))
    choice = detector.tune(holdout)
    # Forwards: one per image at eps = 0, then one per eps > 0 for each image whose gradient sign at this T
    # differs from its sign at every smaller T (closed-form gradients of the linear net, counted here).
    x = np.concatenate([pos, neg])
    signs = [np.sign(closed_form_perturbed(model.network, x, t, 0.0)[1]).reshape(n, -1) for t in temperatures]
    distinct = sum(not any((signs[j][i] == signs[k][i]).all() for k in range(j)) for j in range(3) for i in range(n))
    assert n < distinct < 3 * n, "the data no longer exercise the reuse"
    assert choice["grid_directions"] == distinct
    assert model.passes["other"] == {"forward_backward": n * 3, "forward": n + distinct * 3}
    model.passes.clear()
    detector.choice = {"temperature": 10.0, "epsilon": 0.002}
    detector.score(holdout.positives)
    assert model.passes["other"] == {"forward_backward": 30, "forward": 30}
    model.passes.clear()
    detector.choice = {"temperature": 10.0, "epsilon": 0.0}
    detector.score(holdout.positives)
    assert model.passes == {}



def test_fgsm_matches_closed_form_across_chunks():
    model = handle(batch_size=7)  # labels must follow the chunks input_gradient sees
    x = images(25, 0.0, 1.0, seed=10)
    labels = np.random.default_rng(11).integers(0, CLASSES, 25)
    w, b = model.network.numpy()
    flat = x.reshape(25, -1).astype(np.float64)
    grad = (softmax(flat @ w.T + b, axis=1) - np.eye(CLASSES)[labels]) @ w  # d CE / dx
    expected = np.clip(flat + 0.05 * np.sign(grad), 0, 1).reshape(x.shape)
    got = fgsm(model, torch.from_numpy(x), labels, 0.05).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_odin_nood_tunes_on_clean_vs_fgsm_validation_only():
    model = handle()
    x = images(60, 0.0, 1.0, seed=12)
    logits = model.logits(torch.from_numpy(x)).numpy()
    labels = logits.argmax(1)
    val = view(model, x, OdinNoOOD.needs, labels)
    temperatures, epsilons = (1.0, 10.0), (0.0, 0.01, 0.05)
    detector = OdinNoOOD(temperatures=temperatures, epsilons=epsilons)
    detector.fit(FitContext(val, val, CLASSES, 0, torch.device("cpu"), model))
    adversarial = fgsm(model, torch.from_numpy(x), labels, 0.05).numpy()
    fprs = {
        (t, e): sklearn_fpr95(closed_form_score(model.network, x, t, e), closed_form_score(model.network, adversarial, t, e))
        for t, e in itertools.product(temperatures, epsilons)
    }
    best = min(sorted(fprs), key=lambda k: fprs[k])
    assert (detector.choice["temperature"], detector.choice["epsilon"]) == best
    assert detector.choice["val_fpr95"] == pytest.approx(fprs[best], abs=1e-12)
    assert detector.metadata() == detector.choice
    assert not OdinNoOOD.tunes_on_source and Odin.tunes_on_source
    assert "labels" not in Odin.needs and "labels" in OdinNoOOD.needs
