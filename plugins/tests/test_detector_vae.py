"""Known-answer tests of the VAE feature-density detector: its bounds against the exact likelihood."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from oodbench.api import FitContext, ImageSet, PluginError, SplitView
from oodbench_plugins.detectors.vae import FeatureVAE


def view(features: np.ndarray, name: str = "x") -> SplitView:
    n = len(features)
    return SplitView(name, np.zeros((n, 3), np.float32), features.astype(np.float32),
                     ImageSet(np.zeros((n, 1, 1, 1), np.uint8)))


def fitted(train: np.ndarray, **options) -> FeatureVAE:
    detector = FeatureVAE(**options)
    detector.fit(FitContext(view(train, "train"), view(train[:50], "val"), 3, 0, torch.device("cpu")))
    return detector


def curve(n: int, seed: int = 0) -> np.ndarray:
    """Noisy 1-D curve in 2-D on scales 3 and ~0.7: a one-dimensional latent explains it."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=n)
    return np.c_[3.0 * t + 0.1 * rng.normal(size=n), 0.5 * (t ** 2 + 0.3 * rng.normal(size=n))] + [1.0, -2.0]


SMALL = dict(hidden=32, latent=1, epochs=40, batch_size=64, min_var=1e-2)


def decoded(detector: FeatureVAE, z: torch.Tensor) -> Normal:
    """p(x|z) in standardised units, built from the decoder's raw outputs independently of
    the module's own log-density code: mean, softplus(.) + min_var."""
    mean, raw = detector.net.decoder(z).chunk(2, dim=-1)
    return Normal(mean, (F.softplus(raw) + detector.min_var).sqrt())


def exact_log_likelihood(detector: FeatureVAE, points: np.ndarray) -> torch.Tensor:
    """log p(x) in feature units, by quadrature over the one-dimensional latent:
    log integral p(x|z) N(z; 0, 1) dz - sum_j log scale_j."""
    x = torch.from_numpy(detector.standardiser(points))
    z = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)[:, None, None]
    with torch.no_grad():
        log_joint = decoded(detector, z).log_prob(x).sum(-1) + Normal(0.0, 1.0).log_prob(z)[..., 0]
    return torch.logsumexp(log_joint, 0) + math.log(24.0 / 48000) - detector.standardiser.log_scale


def with_poor_encoder(detector: FeatureVAE) -> FeatureVAE:
    """The same decoder, so the same log p(x), with the posterior means shifted by 0.5 and the
    variances e times too large: a gap between the bounds and log p(x) that is known to be real."""
    poor = copy.deepcopy(detector)
    with torch.no_grad():
        poor.net.encoder[-1].bias += 0.5
    return poor


@pytest.fixture(scope="module")
def curve_vae() -> FeatureVAE:
    return fitted(curve(600), elbo_samples=4000, **SMALL)


def test_elbo_is_below_the_exact_log_likelihood(curve_vae: FeatureVAE) -> None:
    points = curve(8, seed=1)
    exact = exact_log_likelihood(curve_vae, points).numpy()
    x = torch.from_numpy(curve_vae.standardiser(points))
    generator = torch.Generator().manual_seed(0)
    for detector in (curve_vae, with_poor_encoder(curve_vae)):
        elbo = detector.score(view(points))
        # Independent estimate: mean of log p(x|z) + log p(z) - log q(z|x) over 4,000 draws from q.
        with torch.no_grad():
            mu, log_var = detector.net.encode(x)
            q = Normal(mu, (0.5 * log_var).exp())
            z = mu + q.stddev * torch.randn((4000, *mu.shape), generator=generator, dtype=torch.float64)
            terms = decoded(detector, z).log_prob(x).sum(-1) + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
        reference = terms.mean(0).numpy() - detector.standardiser.log_scale
        stderr = terms.std(0).numpy() / math.sqrt(4000)
        np.testing.assert_array_less(np.abs(elbo - reference), 6 * stderr)  # both are Monte Carlo
        np.testing.assert_array_less(elbo, exact + 4 * stderr)
    assert (exact - curve_vae.score(view(points))).mean() < 0.5  # a trained encoder: a tight bound
    assert (exact - elbo > 0.1).all()  # the poor one: a clear gap


def test_iwae_bound_increases_with_k_towards_the_exact_log_likelihood(curve_vae: FeatureVAE) -> None:
    net = with_poor_encoder(curve_vae).net
    points = curve(4, seed=2)
    exact = exact_log_likelihood(curve_vae, points)
    x = torch.from_numpy(curve_vae.standardiser(points))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        # Expectations over 2,000 replicates of each point.
        means = [net.iwae(x.repeat(2000, 1), k, generator).view(2000, -1).mean(0) for k in (1, 10, 100)]
        tight = net.iwae(x, 100000, generator)
    means, tight = [m - curve_vae.standardiser.log_scale for m in means], tight - curve_vae.standardiser.log_scale
    assert (exact - means[0] > 0.1).all()
    assert (means[0] < means[1]).all() and (means[1] < means[2]).all() and (means[2] < exact).all()
    torch.testing.assert_close(tight, exact, atol=0.02, rtol=0)


def test_score_with_iwae_option_matches_exact_log_likelihood(curve_vae: FeatureVAE) -> None:
    # Same seed, same training: iwae_samples changes only how scores are estimated.
    iwae = fitted(curve(600), iwae_samples=5000, **SMALL)
    points = curve(4, seed=3)
    np.testing.assert_allclose(iwae.score(view(points)), exact_log_likelihood(curve_vae, points).numpy(), atol=0.03)
    assert iwae.metadata()["bound"] == "iwae_5000" and curve_vae.metadata()["bound"] == "elbo_4000"


def test_training_increases_train_elbo() -> None:
    train = curve(600)
    before = fitted(train, **{**SMALL, "epochs": 1}).metadata()
    after = fitted(train, **SMALL).metadata()
    assert after["mean_train_score"] > before["mean_train_score"] + 0.5
    assert after["final_train_loss"] < before["final_train_loss"] - 0.5


def test_far_points_score_lower(curve_vae: FeatureVAE) -> None:
    near = curve_vae.score(view(curve(200, seed=4)))
    far = curve_vae.score(view(curve(200, seed=4) + [0.0, 6.0]))
    assert far.max() < np.median(near)


def test_finite_on_constant_features() -> None:
    rng = np.random.default_rng(0)
    train = np.c_[rng.normal(size=(300, 2)), np.zeros(300), np.full(300, 0.7)]
    detector = fitted(train, hidden=16, latent=2, epochs=40)
    test = train[:50].copy()
    moved = test.copy()
    moved[:, 2] = 0.5  # a dead unit that fires
    on, off = detector.score(view(test)), detector.score(view(moved))
    assert on.dtype == np.float64 and np.isfinite(on).all() and np.isfinite(off).all()
    assert (off < on).all()
    everything_constant = fitted(np.ones((100, 3)), hidden=8, latent=2, epochs=5)
    assert np.isfinite(everything_constant.score(view(rng.normal(size=(10, 3))))).all()


def test_deterministic_under_seed() -> None:
    train, test = curve(300), curve(50, seed=1)
    first = fitted(train, hidden=16, latent=2, epochs=3, seed=4)
    again = fitted(train, hidden=16, latent=2, epochs=3, seed=4)
    other = fitted(train, hidden=16, latent=2, epochs=3, seed=5)
    np.testing.assert_array_equal(first.score(view(test)), first.score(view(test)))  # scoring is reproducible
    np.testing.assert_array_equal(first.score(view(test)), again.score(view(test)))
    assert not np.allclose(first.score(view(test)), other.score(view(test)))


def test_non_finite_scores_raise() -> None:
    detector = fitted(curve(200), hidden=8, latent=2, epochs=1)
    bad = curve(5)
    bad[2, 0] = np.nan
    with pytest.raises(PluginError, match="not finite"):
        detector.score(view(bad))
