"""Known-answer tests for the torch diagonal-GMM EM engine and the GMM detectors (gmm, zheng)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import norm
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from oodbench.api import FitContext, ImageSet, SplitView
from oodbench_plugins.detectors.gmm import FeatureGMM, ZhengHong
from oodbench_plugins.detectors.gmm_em import fit_diagonal_gmm


def _features(n: int = 600, d: int = 6, seed: int = 0) -> np.ndarray:
    """Non-negative, clustered, like post-ReLU penultimate features."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 4, size=(4, d))
    return np.maximum(centres[rng.integers(0, 4, n)] + rng.normal(scale=0.7, size=(n, d)), 0.0)


def _sklearn(x: np.ndarray, k: int, **kwargs) -> GaussianMixture:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return GaussianMixture(k, covariance_type="diag", **kwargs).fit(x)


def _start(x: np.ndarray, k: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shared initial (weights, means, variances) with sensible variances."""
    rng = np.random.default_rng(seed)
    means = x[rng.choice(len(x), k, replace=False)]
    return np.full(k, 1.0 / k), means, np.tile(x.var(0) + 0.1, (k, 1))


def _view(features: np.ndarray, logits: np.ndarray | None = None, labels: np.ndarray | None = None,
          allowed: frozenset[str] | None = None) -> SplitView:
    n = len(features)
    if logits is None:
        logits = np.zeros((n, 2), np.float32)
    images = ImageSet(np.zeros((n, 1, 2, 2), np.uint8))
    view = SplitView("synthetic", logits.astype(np.float32), features.astype(np.float32), images, labels)
    return view if allowed is None else view.restricted(allowed)


def _ctx(train: SplitView, val: SplitView, num_classes: int = 2, seed: int = 0) -> FitContext:
    return FitContext(train=train, val=val, num_classes=num_classes, seed=seed, device=torch.device("cpu"))


# ------------------------------------------------------------------------------------ EM engine
@pytest.mark.parametrize("init", ["kmeans", "random_from_data"])
@pytest.mark.parametrize("tol,max_iter", [(1e-3, 100), (0.0, 7)])
def test_em_reproduces_sklearn_float64(init, tol, max_iter):
    x = _features()
    sk = _sklearn(x, 5, reg_covar=1e-4, tol=tol, max_iter=max_iter, init_params=init, random_state=3)
    ours = fit_diagonal_gmm(torch.from_numpy(x), 5, reg_covar=1e-4, tol=tol, max_iter=max_iter, init=init, seed=3)
    assert (ours.n_iter, ours.converged) == (sk.n_iter_, sk.converged_)
    if tol == 0.0:
        assert ours.n_iter == max_iter
    assert ours.lower_bound == pytest.approx(sk.lower_bound_, rel=1e-10)
    np.testing.assert_allclose(ours.weights.numpy(), sk.weights_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.means.numpy(), sk.means_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(ours.variances.numpy(), sk.covariances_, rtol=1e-9)
    x_new = _features(seed=9)
    np.testing.assert_allclose(ours.log_likelihood(x_new).numpy(), sk.score_samples(x_new), rtol=1e-10)
    assert float(ours.log_likelihood(x).mean()) == pytest.approx(sk.score(x), rel=1e-10)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_em_from_given_start_matches_sklearn(dtype, rtol):
    x = _features(n=800, d=10)
    w, mu, var = _start(x, 6)
    sk = _sklearn(x, 6, reg_covar=1e-4, tol=0.0, max_iter=12, weights_init=w, means_init=mu,
                  precisions_init=1.0 / var, init_params="random_from_data")
    ours = fit_diagonal_gmm(torch.from_numpy(x).to(dtype), 6, reg_covar=1e-4, tol=0.0, max_iter=12,
                            init=(torch.from_numpy(w), torch.from_numpy(mu), torch.from_numpy(var)))
    assert ours.n_iter == sk.n_iter_ == 12
    reference = sk.score_samples(x)
    ll = ours.log_likelihood(x.astype(np.float32) if dtype == torch.float32 else x).double().numpy()
    np.testing.assert_allclose(ll, reference, rtol=rtol, atol=rtol * np.abs(reference).mean())
    assert ll.mean() == pytest.approx(reference.mean(), rel=rtol)


def test_log_likelihood_is_the_closed_form_density():
    gmm = fit_diagonal_gmm(torch.from_numpy(_features()), 3, max_iter=5, seed=0)
    x = _features(n=50, seed=4)
    w, mu, var = gmm.weights.numpy(), gmm.means.numpy(), gmm.variances.numpy()
    per_component = norm.logpdf(x[:, None, :], mu[None], np.sqrt(var)[None]).sum(2) + np.log(w)
    expected = logsumexp(per_component, axis=1)
    np.testing.assert_allclose(gmm.log_likelihood(x).numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(gmm.bits_per_dim(x).numpy(), -expected / (x.shape[1] * math.log(2)), rtol=1e-12)


def test_em_recovers_a_known_mixture():
    rng = np.random.default_rng(0)
    weights = np.array([0.2, 0.3, 0.5])
    means = np.array([[0.0, 0.0, 0.0], [8.0, 0.0, 4.0], [0.0, 9.0, -5.0]])
    stds = np.array([[1.0, 0.5, 1.0], [0.5, 1.0, 2.0], [1.5, 1.0, 0.5]])
    z = rng.choice(3, size=6000, p=weights)
    x = means[z] + stds[z] * rng.normal(size=(6000, 3))
    gmm = fit_diagonal_gmm(torch.from_numpy(x).float(), 3, seed=0)
    assert gmm.converged
    order = np.argsort(gmm.means[:, 0].numpy() + 2 * gmm.means[:, 1].numpy())  # (0,0) < (8,0) < (0,9)
    np.testing.assert_allclose(gmm.weights.numpy()[order], weights, atol=0.02)
    np.testing.assert_allclose(gmm.means.numpy()[order], means, atol=0.1)
    np.testing.assert_allclose(np.sqrt(gmm.variances.numpy()[order]), stds, rtol=0.06)


def test_chunking_does_not_change_the_fit():
    x = torch.from_numpy(_features(n=500))
    whole = fit_diagonal_gmm(x, 4, seed=2, chunk_size=len(x))
    chunked = fit_diagonal_gmm(x, 4, seed=2, chunk_size=7)
    assert chunked.n_iter == whole.n_iter
    assert chunked.lower_bound == pytest.approx(whole.lower_bound, rel=1e-12)
    np.testing.assert_allclose(chunked.means.numpy(), whole.means.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chunked.log_likelihood(x).numpy(), whole.log_likelihood(x).numpy(), rtol=1e-12)


@pytest.fixture
def restore_matmul_precision():
    yield
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False


def _legacy_flags() -> tuple[bool, str]:
    return torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()


def test_tf32_is_off_inside_em_and_restored_after(restore_matmul_precision):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    seen = []
    x = torch.from_numpy(_features(n=200)).float()
    gmm = fit_diagonal_gmm(x, 3, max_iter=3, tol=0.0, callback=lambda it, lb: seen.append(_legacy_flags()))
    assert seen == [(False, "highest")] * 3
    assert _legacy_flags() == (True, "high")

    def fail(iteration: int, lower_bound: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_diagonal_gmm(x, 3, callback=fail)
    assert _legacy_flags() == (True, "high")
    gmm.log_likelihood(x)
    assert _legacy_flags() == (True, "high")


@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9")
def test_tf32_guard_respects_the_per_backend_api(restore_matmul_precision):
    matmul = torch.backends.cuda.matmul
    matmul.fp32_precision = "tf32"
    seen = []
    fit_diagonal_gmm(torch.from_numpy(_features(n=200)).float(), 3, max_iter=2, tol=0.0,
                     callback=lambda it, lb: seen.append(matmul.fp32_precision))
    assert seen == ["ieee", "ieee"]
    assert matmul.fp32_precision == "tf32"
    matmul.fp32_precision = "none"


# ------------------------------------------------------------------------------------ detectors
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-10), ("float32", 1e-4)])
def test_gmm_detector_equals_sklearn_score_samples(dtype, rtol):
    train, test = _features(n=400).astype(np.float32), _features(n=100, seed=5).astype(np.float32)
    detector = FeatureGMM(k=4, dtype=dtype, seed=7)
    detector.fit(_ctx(_view(train), _view(test)))
    # sklearn on the same float32 array runs KMeans on the same numbers, hence the same init.
    x_sk = train.astype(np.float64) if dtype == "float64" else train
    sk = _sklearn(x_sk, 4, reg_covar=1e-4, random_state=7)
    reference = sk.score_samples(test.astype(np.float64))
    scores = detector.score(_view(test))
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, reference, rtol=rtol, atol=rtol * np.abs(reference).mean())
    meta = detector.metadata()
    assert (meta["k_fitted"], meta["n_iter"], meta["converged"]) == (4, sk.n_iter_, sk.converged_)
    assert meta["val_bpd"] == pytest.approx(-reference.mean() / (train.shape[1] * math.log(2)), rel=rtol)


def test_gmm_scores_far_points_lower_and_never_reads_labels():
    train = _features(n=300)
    labels = np.zeros(len(train), np.int64)
    detector = FeatureGMM(k=3)
    # a view restricted to what gmm declares raises if labels are read
    detector.fit(_ctx(_view(train, labels=labels, allowed=FeatureGMM.needs), _view(train[:50], allowed=FeatureGMM.needs)))
    near, far = train[:20], train[:20] + 25.0
    scores_near, scores_far = detector.score(_view(near)), detector.score(_view(far))
    assert scores_far.max() < scores_near.min()
    assert np.isfinite(scores_far).all()


def test_gmm_clamps_k_to_ten_points_per_component():
    detector = FeatureGMM(k=1000)
    train = _features(n=230)
    detector.fit(_ctx(_view(train), _view(train)))
    assert detector.metadata()["k_fitted"] == 23
    assert np.isfinite(detector.score(_view(train))).all()


@pytest.mark.parametrize("cls", [FeatureGMM, ZhengHong])
def test_constant_feature_dimensions_give_finite_scores(cls):
    train = _features(n=200)
    train[:, [1, 4]] = 0.0  # dead units: zero variance everywhere
    labels = (train[:, 0] > np.median(train[:, 0])).astype(np.int64)
    detector = cls(k=3)
    detector.fit(_ctx(_view(train, labels=labels), _view(train)))
    test = _features(n=40, seed=3)
    logits = np.stack([np.zeros(40), test[:, 0] - np.median(train[:, 0])], 1)
    scores = detector.score(_view(test, logits=logits))
    assert np.isfinite(scores).all()
    assert np.isfinite(detector.score(_view(train, logits=np.stack([1 - labels, labels], 1).astype(np.float32)))).all()


def _two_classes(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    centres = np.array([[0.0, 0.0, 0.0], [6.0, 6.0, 6.0]])
    x = centres[labels] + rng.normal(scale=[0.3, 1.0, 0.6], size=(n, 3))
    return x.astype(np.float32).astype(np.float64), labels  # SplitView holds float32


def test_zheng_scores_under_the_predicted_class_mixture():
    train, labels = _two_classes()
    # training logits that disagree with the labels for half the points: fitting must use labels
    train_logits = np.zeros((len(train), 2))
    train_logits[::2, 0] = 5.0
    detector = ZhengHong(k=2, dtype="float64", seed=1)
    detector.fit(_ctx(_view(train, train_logits, labels), _view(train, train_logits, labels)))
    per_class = [_sklearn(train[labels == c], 2, reg_covar=1e-4, random_state=1) for c in (0, 1)]

    test, true = _two_classes(n=40, seed=3)
    predicted = np.where(np.arange(40) % 3 == 0, 1 - true, true)  # a third predicted wrongly
    logits = np.eye(2)[predicted] * 4.0
    scores = detector.score(_view(test, logits))
    expected = np.where(predicted == 0, per_class[0].score_samples(test), per_class[1].score_samples(test))
    np.testing.assert_allclose(scores, expected, rtol=1e-10)
    # the same point scores high under its own class's mixture and low under the other's
    assert scores[predicted != true].max() < scores[predicted == true].min()
    far = detector.score(_view(np.full((1, 3), 30.0), np.array([[4.0, 0.0]])))
    assert far[0] < scores[predicted == true].min()
    assert detector.metadata()["k_fitted"] == [2, 2]


def test_gmm_log_density_and_its_gradient_match_scikit_learn(registry):
    # The fitted mixture's log_density against sklearn's score_samples on the same parameters, and its autograd
    # gradient against the mixture's closed form grad log p(x) = sum_k r_k(x) (mu_k - x) / var_k.
    rng = np.random.default_rng(1)
    train = np.concatenate([rng.normal(0, 1, (300, 3)), rng.normal(4, 0.5, (300, 3))]).astype(np.float32)
    view = SplitView("train", np.zeros((600, 2), np.float32), train, None)
    detector = registry.get("detectors", "gmm").target(k=2, dtype="float64")
    detector.fit(FitContext(view, view, 2, 0, torch.device("cpu")))
    gmm = detector.gmm
    reference = GaussianMixture(2, covariance_type="diag")
    reference.weights_, reference.means_ = gmm.weights.numpy(), gmm.means.numpy()
    reference.covariances_ = gmm.variances.numpy()
    reference.precisions_cholesky_ = 1 / np.sqrt(gmm.variances.numpy())
    x = rng.normal(2, 2, (50, 3))
    features = torch.tensor(x, requires_grad=True)
    log_p = detector.log_density(features)
    np.testing.assert_allclose(log_p.detach().numpy(), reference.score_samples(x), rtol=1e-10)
    (gradient,) = torch.autograd.grad(log_p.sum(), features)
    r = reference.predict_proba(x)
    expected = sum(r[:, [k]] * (reference.means_[k] - x) / reference.covariances_[k] for k in range(2))
    np.testing.assert_allclose(gradient.numpy(), expected, rtol=1e-8, atol=1e-10)
