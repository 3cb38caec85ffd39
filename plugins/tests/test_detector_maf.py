"""Known-answer tests of the MAF feature-density detector: exact density, exact log-dets, masks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from oodbench.api import FitContext, ImageSet, PluginError, SplitView
from oodbench_plugins.detectors.maf import FeatureMAF, _MADE, _MAF


def view(features: np.ndarray, name: str = "x") -> SplitView:
    n = len(features)
    return SplitView(name, np.zeros((n, 3), np.float32), features.astype(np.float32),
                     ImageSet(np.zeros((n, 1, 1, 1), np.uint8)))


def fitted(train: np.ndarray, **options) -> FeatureMAF:
    detector = FeatureMAF(**options)
    detector.fit(FitContext(view(train, "train"), view(train[:50], "val"), 3, 0, torch.device("cpu")))
    return detector


def banana(n: int, seed: int = 0) -> np.ndarray:
    """Curved 2-D data on scales 3 and 0.5, so a missing standardisation Jacobian shows."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)
    return np.c_[3.0 * t, 0.5 * (t ** 2 + 0.3 * rng.normal(size=n))] + [1.0, -2.0]


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters everywhere (the output layers start at zero, which would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=generator))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=generator))
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=generator) + 0.5)
    return module.double().eval()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_density_integrates_to_one(batch_norm: bool) -> None:
    detector = fitted(banana(600), layers=3, hidden=32, epochs=15, batch_norm=batch_norm)
    a, b = np.linspace(1 - 30, 1 + 30, 301), np.linspace(-2 - 6, -2 + 12, 301)
    grid = np.stack(np.meshgrid(a, b, indexing="ij"), -1).reshape(-1, 2)
    density = np.exp(detector.score(view(grid))).reshape(len(a), len(b))
    mass = np.trapezoid(np.trapezoid(density, b, axis=1), a)
    assert mass == pytest.approx(1.0, abs=0.015)


def test_log_det_matches_autograd_jacobian() -> None:
    flow = randomised(_MAF(4, layers=3, hidden=8, hidden_layers=2, batch_norm=True, bound=3.0))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, log_det = flow(x)
    for row, expected in zip(x, log_det):
        jacobian = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], row)
        assert torch.linalg.slogdet(jacobian).logabsdet.item() == pytest.approx(expected.item(), abs=1e-10)
        # The order is reversed between layers, so the whole flow is not triangular.
        assert jacobian.triu(1).abs().sum() > 0 and jacobian.tril(-1).abs().sum() > 0


def test_made_is_autoregressive() -> None:
    dim = 5
    made = randomised(_MADE(dim, hidden=12, hidden_layers=2, bound=3.0))
    points = torch.randn(20, dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    strictly_lower = torch.tril(torch.ones(dim, dim, dtype=torch.bool), diagonal=-1)
    reach = torch.zeros(dim, dim, dtype=torch.float64)
    for x in points:
        jacobian = torch.autograd.functional.jacobian(lambda v: made.shift_and_log_scale(v[None]), x)
        jacobian = torch.stack([j[0] for j in jacobian])  # (mu, alpha) x out x in
        assert (jacobian[:, ~strictly_lower] == 0).all()  # output i never sees x_j, j >= i
        reach += jacobian.abs().sum(0)
        u_jacobian = torch.autograd.functional.jacobian(lambda v: made(v[None])[0][0], x)
        _, alpha = made.shift_and_log_scale(x[None])
        assert torch.allclose(u_jacobian.diagonal(), torch.exp(-alpha[0]))
        assert (u_jacobian.triu(1) == 0).all()
    assert (reach[strictly_lower] > 0).all()  # and it does see every x_j, j < i


def test_training_increases_train_log_likelihood() -> None:
    train = banana(600)
    before = fitted(train, layers=3, hidden=32, epochs=1).metadata()
    after = fitted(train, layers=3, hidden=32, epochs=20).metadata()
    assert after["mean_train_score"] > before["mean_train_score"] + 0.5
    assert after["final_train_loss"] < before["final_train_loss"] - 0.5


def test_gaussian_with_known_covariance() -> None:
    mean, cov = np.array([1.0, -2.0]), np.array([[2.0, 1.2], [1.2, 1.0]])
    rng = np.random.default_rng(0)
    train, test = rng.multivariate_normal(mean, cov, 1000), rng.multivariate_normal(mean, cov, 1000)
    detector = fitted(train, layers=2, hidden=16, epochs=10, lr=1e-2)
    truth = multivariate_normal(mean, cov).logpdf(test)
    scores = detector.score(view(test))
    assert scores.dtype == np.float64
    assert scores.mean() == pytest.approx(truth.mean(), abs=0.03)
    assert np.corrcoef(scores, truth)[0, 1] > 0.98


def test_far_points_score_lower() -> None:
    detector = fitted(banana(600), layers=3, hidden=32, epochs=10)
    near, far = detector.score(view(banana(200, seed=1))), detector.score(view(banana(200, seed=1) + [0.0, 6.0]))
    assert far.max() < np.median(near)


def test_finite_on_constant_features() -> None:
    rng = np.random.default_rng(0)
    train = np.c_[rng.normal(size=(300, 2)), np.zeros(300), np.full(300, 0.7)]
    detector = fitted(train, layers=3, hidden=16, epochs=10)
    test = train[:50].copy()
    moved = test.copy()
    moved[:, 2] = 0.2  # a dead unit that fires
    on, off = detector.score(view(test)), detector.score(view(moved))
    assert np.isfinite(on).all() and np.isfinite(off).all()
    assert (off < on).all()
    everything_constant = fitted(np.ones((100, 3)), layers=2, hidden=8, epochs=5)
    assert np.isfinite(everything_constant.score(view(rng.normal(size=(10, 3))))).all()


def test_deterministic_under_seed() -> None:
    train, test = banana(300), banana(50, seed=1)
    first = fitted(train, layers=2, hidden=16, epochs=3, seed=4).score(view(test))
    again = fitted(train, layers=2, hidden=16, epochs=3, seed=4).score(view(test))
    other = fitted(train, layers=2, hidden=16, epochs=3, seed=5).score(view(test))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_non_finite_scores_raise() -> None:
    detector = fitted(banana(200), layers=2, hidden=8, epochs=1)
    bad = banana(5)
    bad[2, 0] = np.nan
    with pytest.raises(PluginError, match="not finite"):
        detector.score(view(bad))
