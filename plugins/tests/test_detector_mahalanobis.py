"""Known-answer tests for the Mahalanobis score: closed form, scikit-learn, closed-form preprocessing."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import roc_curve

from oodbench.api import FitContext, ImageSet, SplitView
from oodbench.classifier import ClassifierHandle
from oodbench_plugins.detectors.mahalanobis import Mahalanobis, MahalanobisPreprocessed
from oodbench_plugins.detectors.odin import fgsm

CPU = torch.device("cpu")


def feature_view(feats: np.ndarray, labels: np.ndarray | None = None) -> SplitView:
    images = ImageSet(np.zeros((len(feats), 1, 1, 1), np.float32))
    return SplitView("v", np.zeros((len(feats), 2), np.float32), feats.astype(np.float32), images, labels, Mahalanobis.needs)


def gaussian_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    means = rng.normal(0, 3, (4, 6))
    mixing = rng.normal(0, 1, (6, 6))
    return means[labels] + rng.normal(0, 1, (n, 6)) @ mixing, labels


def fit(detector: Mahalanobis, train: SplitView, val: SplitView | None = None, model: ClassifierHandle | None = None) -> Mahalanobis:
    detector.fit(FitContext(train, val or train, 4, 0, CPU, model))
    return detector


def test_matches_closed_form():
    feats, labels = gaussian_classes(800, seed=0)
    feats = feats.astype(np.float32).astype(np.float64)  # what the detector sees
    test = np.random.default_rng(1).normal(0, 5, (200, 6)).astype(np.float32).astype(np.float64)
    means = np.stack([feats[labels == c].mean(0) for c in range(4)])
    centered = feats - means[labels]
    precision = np.linalg.inv(centered.T @ centered / len(feats))
    distances = np.stack([np.einsum("nd,de,ne->n", test - m, precision, test - m) for m in means], 1)
    got = fit(Mahalanobis(), feature_view(feats, labels)).score(feature_view(test))
    np.testing.assert_allclose(got, -distances.min(1), rtol=1e-8)


def test_matches_sklearn_empirical_covariance_with_singular_features():
    feats, labels = gaussian_classes(600, seed=2)
    # A constant unit and a duplicated unit make Sigma singular: the authors' pinvh precision applies.
    feats = np.c_[feats, np.full(len(feats), 0.25), feats[:, 0]].astype(np.float32).astype(np.float64)
    means = np.stack([feats[labels == c].mean(0) for c in range(4)])
    precision = EmpiricalCovariance(assume_centered=False).fit(feats - means[labels]).precision_
    test = np.c_[np.random.default_rng(3).normal(0, 5, (100, 6)), np.full(100, 0.25), np.zeros(100)]
    test[:, 7] = test[:, 0]
    test = test.astype(np.float32).astype(np.float64)
    expected = -np.stack([np.einsum("nd,de,ne->n", test - m, precision, test - m) for m in means], 1).min(1)
    detector = fit(Mahalanobis(), feature_view(feats, labels))
    np.testing.assert_allclose(detector.score(feature_view(test)), expected, rtol=1e-8)
    assert detector.metadata() == {"feature_dim": 8, "covariance_rank": 6, "classes": 4}


class LinearFeatures(torch.nn.Module):
    """features = A vec(x), logits = B features: the distance gradient has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(16, 5, bias=False)
        self.b = torch.nn.Linear(5, 4)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.a(x.flatten(1))
        return self.b(feats), feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def pixel_classes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(100).uniform(0, 1, (4, 1, 4, 4))
    labels = rng.integers(0, 4, n)
    return (prototypes[labels] + rng.normal(0, 0.15, (n, 1, 4, 4))).astype(np.float32), labels


def image_view(model: ClassifierHandle, x: np.ndarray, labels: np.ndarray | None = None) -> SplitView:
    logits, feats = model.outputs(torch.from_numpy(x))
    model.passes.clear()
    return SplitView("v", logits.numpy(), feats.numpy(), ImageSet(x), labels, MahalanobisPreprocessed.needs)


def closed_form_pre_scores(model: ClassifierHandle, train: SplitView, x: np.ndarray, epsilon: float) -> np.ndarray:
    """-min_c d_c(A x^), x^ = x - eps sign(2 A^T P (A x - mu_c*)), P = pinv(Sigma) of the train features."""
    a = model.network.a.weight.detach().double().numpy()
    feats, labels = train.features.astype(np.float64), train.labels
    means = np.stack([feats[labels == c].mean(0) for c in range(4)])
    centered = feats - means[labels]
    precision = np.linalg.pinv(centered.T @ centered / len(feats))

    def distances(flat: np.ndarray) -> np.ndarray:
        f = flat @ a.T
        return np.stack([np.einsum("nd,de,ne->n", f - m, precision, f - m) for m in means], 1)

    flat = x.reshape(len(x), -1).astype(np.float64)
    closest = means[distances(flat).argmin(1)]
    grad = 2 * (flat @ a.T - closest) @ precision @ a
    return -distances(flat - epsilon * np.sign(grad)).min(1)


def test_preprocessing_matches_closed_form_and_raises_the_score():
    model = ClassifierHandle(LinearFeatures(), CPU)
    train = image_view(model, *pixel_classes(400, seed=4))
    x = pixel_classes(100, seed=5)[0]
    test = image_view(model, x)
    plain = fit(Mahalanobis(), train).score(test)
    detector = fit(MahalanobisPreprocessed(epsilons=(0.01,)), train, model=model)
    got = detector.score(test)
    np.testing.assert_allclose(got, closed_form_pre_scores(model, train, x, 0.01), rtol=1e-4)
    assert (got > plain).all()
    assert model.passes["other"] == {"forward_backward": 100, "forward": 100}


def sklearn_fpr95(pos: np.ndarray, neg: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(np.r_[np.ones(len(pos)), np.zeros(len(neg))], np.r_[pos, neg], drop_intermediate=False)
    return float(fpr[np.searchsorted(tpr, 0.95 - 1e-12)])


def test_fit_picks_epsilon_on_clean_vs_fgsm_validation():
    model = ClassifierHandle(LinearFeatures(), CPU)
    train = image_view(model, *pixel_classes(400, seed=6))
    x, labels = pixel_classes(80, seed=7)
    val = image_view(model, x, labels)
    epsilons = (0.2, 0.0, 0.05, 0.01, 0.1)  # unsorted on purpose
    # FGSM at 0.2 makes the validation negatives separable enough for eps to matter here.
    detector = fit(MahalanobisPreprocessed(epsilons=epsilons, fgsm_epsilon=0.2), train, val, model)
    # FGSM (1 per image), the distance gradient on clean + FGSM (2), one forward per eps on both.
    assert model.passes["other"] == {"forward_backward": 3 * 80, "forward": 2 * 80 * 5}
    adversarial = fgsm(model, torch.from_numpy(x), labels, 0.2).numpy()
    fprs = {e: sklearn_fpr95(closed_form_pre_scores(model, train, x, e), closed_form_pre_scores(model, train, adversarial, e))
            for e in sorted(epsilons)}
    best = min(fprs, key=lambda e: fprs[e])
    assert best == 0.05, "the data no longer make eps matter: the test would prove little"
    assert detector.epsilon == best
    for e, fpr in fprs.items():
        assert detector.val_fpr95[str(e)] == pytest.approx(fpr, abs=1e-12)


def test_default_noise_grid_is_the_authors():
    """Issue 20 item 11: both Mahalanobis detectors search the noise magnitudes of Lee et al.'s
    OOD_Generate_Mahalanobis.py / OOD_Regression_Mahalanobis.py, and nothing wider."""
    from oodbench_plugins.detectors.mahalanobis_ensemble import MahalanobisEnsemble

    authors = [0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005]  # the scripts' m_list, in their order
    assert MahalanobisPreprocessed().epsilons == tuple(sorted(authors))
    assert MahalanobisEnsemble().epsilons == tuple(sorted(authors))
