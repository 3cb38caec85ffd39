"""pixel-vae: the IWAE bound against log p(x) computed without the VAE's own code (scipy's Bernoulli, quadrature
over a one-dimensional latent), training on real digits, and the detector contract."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats
from sklearn.metrics import roc_auc_score

from oodbench.api import FitContext, ImageSet, SplitView
from oodbench.testing import check_detector
from oodbench_plugins.detectors.pixel_vae import PixelVAE, _BernoulliVAE, binarise


def view(images: np.ndarray, name: str = "x") -> SplitView:
    return SplitView(name, np.zeros((len(images), 2), np.float32), None, ImageSet(images, None, name))


def fitted(images: np.ndarray, **options) -> PixelVAE:
    detector = PixelVAE(**options)
    detector.fit(FitContext(view(images, "train"), view(images[:20], "val"), 2, 0, torch.device("cpu")))
    return detector


def test_binarise_thresholds_at_half_intensity():
    images = np.array([[[[0, 127], [128, 255]]]], np.uint8)
    np.testing.assert_array_equal(binarise(images), [[0, 0, 1, 1]])
    np.testing.assert_array_equal(binarise(np.array([[[[0.2, 0.6]]]])), [[0, 1]])


def test_iwae_is_exact_when_the_decoder_ignores_z_and_q_is_the_prior():
    # Then every importance weight is p(x) itself: L_k = sum_d log Bernoulli(x_d; sigmoid(b_d)) for any k.
    rng = np.random.default_rng(0)
    detector = fitted(rng.integers(0, 256, (40, 1, 3, 3), dtype=np.uint8), hidden=4, latent=2, steps=1)
    net = detector.net
    with torch.no_grad():
        net.encoder[-1].weight.zero_(), net.encoder[-1].bias.zero_()  # mu = 0, log var = 0: q(z|x) = N(0, I)
        net.decoder[-1].weight.zero_()
        bias = torch.tensor(rng.normal(size=9))
        net.decoder[-1].bias.copy_(bias)
    images = rng.integers(0, 256, (25, 1, 3, 3), dtype=np.uint8)
    p = 1 / (1 + np.exp(-bias.numpy()))
    expected = stats.bernoulli.logpmf(binarise(images), p).sum(1)
    np.testing.assert_allclose(detector.score(view(images)), expected, rtol=1e-12)


def test_iwae_approaches_the_log_likelihood_from_below_as_k_grows():
    # A one-dimensional latent: log p(x) = log integral p(x|z) N(z; 0, 1) dz by numerical integration, apart from the
    # bound's sampling; E L_1 <= E L_16 <= E L_4096 <= log p(x) (Burda et al. 2016, Theorem 1), compared as means
    # over 200 images (one draw of L_1 per image is noisy; the mean's standard error is ~0.03 here).
    rng = np.random.default_rng(1)
    train = (rng.random((200, 1, 2, 3)) < [[[0.9, 0.1, 0.5], [0.3, 0.7, 0.2]]]).astype(np.uint8) * 255
    detector = fitted(train, hidden=8, latent=1, steps=300, batch_size=20)
    net, x = detector.net, torch.tensor(binarise(train))

    # the integral on a dense grid (trapezoid rule in log space): the integrand is smooth and negligible beyond |z| = 10
    grid = np.linspace(-10, 10, 8001)
    with torch.no_grad():
        log_px_given_z = net.log_px_given_z(x[None], torch.tensor(grid)[:, None, None]).numpy()  # grid x images
    log_integrand = log_px_given_z + stats.norm.logpdf(grid)[:, None]
    weights = np.full(len(grid), grid[1] - grid[0])
    weights[[0, -1]] /= 2
    exact = special.logsumexp(log_integrand, axis=0, b=weights[:, None])
    bounds = {}
    for k in (1, 16, 4096):
        detector.iwae_samples = k
        bounds[k] = detector.score(view(train))
    means = [bounds[k].mean() for k in (1, 16, 4096)]
    assert means[0] < means[1] < means[2] <= exact.mean() + 1e-3, (means, exact.mean())
    np.testing.assert_allclose(bounds[4096], exact, atol=0.02)


def test_trained_on_digits_it_ranks_digits_above_noise(registry):
    from oodbench.api import DatasetContext

    digits = registry.get("datasets", "digits").target()
    train = digits.load(DatasetContext(split="train", seed=0, data_dir="."))
    test = digits.load(DatasetContext(split="test", seed=0, data_dir="."))
    detector = fitted(train.x, steps=1500)
    noise = np.random.default_rng(0).integers(0, 256, test.x.shape, dtype=np.uint8)
    scores = np.concatenate([detector.score(view(test.x)), detector.score(view(noise))])
    assert roc_auc_score(np.r_[np.ones(len(test)), np.zeros(len(noise))], scores) > 0.99
    assert detector.metadata()["mean_val_score"] > detector.score(view(noise)).mean() + 5


def test_passes_the_detector_test_kit():
    # 800 steps: the toy's positives and negatives have the same pixel marginals, so only a VAE that uses its
    # latent (has learnt which pixels light up together) tells them apart
    assert check_detector(PixelVAE, {"steps": 800, "hidden": 16, "latent": 2}) == []
