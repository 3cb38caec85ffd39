"""PixelCNN++: exact normalisation of the likelihood, causal masking, training, robustness."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import logistic
from sklearn.datasets import load_digits

from oodbench.api import FitContext, ImageSet, PluginError, SplitView
from oodbench_plugins.detectors.pixelcnn import (
    CONFIGS,
    PixelCNNNet,
    PixelCNNPP,
    discretized_logistic_mix_log_prob,
    num_params,
)

TINY = dict(nr_resnet=1, nr_filters=8, nr_logistic_mix=3, batch_size=50, lr=5e-3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny convolutions gain nothing from a second thread, and on shared cores two OpenMP
    # threads per process make them an order of magnitude slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def view(name: str, x: np.ndarray) -> SplitView:
    n = len(x)
    return SplitView(name, np.zeros((n, 3), np.float32), np.zeros((n, 2), np.float32), ImageSet(x))


def digits(n: int, offset: int = 0) -> np.ndarray:
    images = load_digits().images[offset:offset + n]
    return np.rint(images / 16 * 255).astype(np.uint8)[:, None]


def fitted(epochs: int, seed: int = 0, n: int = 200) -> tuple[PixelCNNPP, SplitView]:
    train = view("train", digits(n))
    det = PixelCNNPP(**TINY, epochs=epochs, seed=seed)
    det.fit(FitContext(train, view("val", digits(50, offset=n)), 3, 0, torch.device("cpu")))
    return det, train


def random_params(channels: int, nr_mix: int, pixels: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(1, num_params(channels, nr_mix), *pixels, generator=g, dtype=torch.float64) * 2
    # log-scales from e^-8 (clamped to e^-7) to e^3: very peaked to nearly flat components
    k = nr_mix
    log_scales = torch.empty(1, channels * k, *pixels, dtype=torch.float64).uniform_(-8, 3, generator=g)
    params[:, k + channels * k:k + 2 * channels * k] = log_scales
    return params


def grid(bins: int) -> torch.Tensor:
    return -1.0 + 2.0 * torch.arange(bins, dtype=torch.float64) / (bins - 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_channel_masses_of_256_levels_sum_to_one(seed: int) -> None:
    params = random_params(1, 5, (4, 4), seed)
    x = grid(256).view(256, 1, 1, 1).expand(256, 1, 4, 4)
    log_p = discretized_logistic_mix_log_prob(x, params.expand(256, -1, -1, -1), 5)
    np.testing.assert_allclose(log_p.exp().sum(0).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("channels,bins", [(2, 7), (3, 6)])
def test_joint_masses_over_all_subpixel_values_sum_to_one(channels: int, bins: int) -> None:
    # the sub-pixel dependence (mean of channel c shifted by earlier channels) keeps the joint normalised
    params = random_params(channels, 4, (2, 3), seed=channels)
    values = list(itertools.product(grid(bins).tolist(), repeat=channels))
    x = torch.tensor(values, dtype=torch.float64).view(len(values), channels, 1, 1).expand(-1, -1, 2, 3)
    log_p = discretized_logistic_mix_log_prob(x, params.expand(len(values), -1, -1, -1), 4, bins=bins)
    np.testing.assert_allclose(log_p.exp().sum(0).numpy(), 1.0, atol=1e-6)


def test_single_logistic_matches_scipy_cdf_differences() -> None:
    mean, log_scale = 0.1, -2.0
    params = torch.tensor([0.0, mean, log_scale], dtype=torch.float64).view(1, 3, 1, 1).expand(256, -1, -1, -1)
    x = grid(256).view(256, 1, 1, 1)
    got = discretized_logistic_mix_log_prob(x, params, 1).exp().flatten().numpy()
    cdf = logistic(loc=mean, scale=math.exp(log_scale)).cdf
    edges = np.r_[-np.inf, (grid(256).numpy()[:-1] + 1 / 255), np.inf]
    np.testing.assert_allclose(got, np.diff(cdf(edges)), rtol=1e-9, atol=1e-300)


def test_three_channel_component_matches_hand_computed_conditionals() -> None:
    # one component: P(r, g, b) = P(r) P(g | r) P(b | r, g), means shifted by tanh(alpha) x_earlier
    mu, log_s, alpha = [0.2, -0.1, 0.3], [-2.0, -1.5, -1.0], [0.5, -0.4, 0.8]
    params = torch.tensor([0.0, *mu, *log_s, *alpha], dtype=torch.float64).view(1, 10, 1, 1)
    r, g, b = grid(256)[[40, 100, 250]].tolist()
    x = torch.tensor([r, g, b], dtype=torch.float64).view(1, 3, 1, 1)
    got = discretized_logistic_mix_log_prob(x, params, 1).item()
    t = np.tanh(alpha)
    means = [mu[0], mu[1] + t[0] * r, mu[2] + t[1] * r + t[2] * g]
    want = sum(
        math.log(logistic(loc=m, scale=math.exp(s)).cdf(v + 1 / 255) - logistic(loc=m, scale=math.exp(s)).cdf(v - 1 / 255))
        for v, m, s in zip([r, g, b], means, log_s)
    )
    assert got == pytest.approx(want, rel=1e-9)


def pixels_seen(net: PixelCNNNet, shape: tuple[int, int, int]) -> torch.Tensor:
    """seen[q, p]: the network output at pixel q (raster index) has a nonzero gradient w.r.t. pixel p."""
    h, w = shape[1:]
    x = (torch.rand(1, *shape, dtype=torch.float64) * 2 - 1).repeat(h * w, 1, 1, 1).requires_grad_(True)
    out = net(x)
    # copy q of the batch back-propagates only from its output at pixel q (images do not interact)
    select = torch.zeros_like(out).flatten(2)
    select[torch.arange(h * w), :, torch.arange(h * w)] = 1.0
    (grad,) = torch.autograd.grad(out, x, select.view_as(out))
    return grad.abs().sum(1).flatten(1) > 0


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 6), (2, 7, 5)])
def test_output_at_a_pixel_never_sees_that_pixel_or_later_ones(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(0)
    net = PixelCNNNet(shape[0], nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0).double().eval()
    seen = pixels_seen(net, shape)
    later_or_self = torch.ones_like(seen).triu()  # [q, p] with p >= q in raster order
    assert not seen[later_or_self].any()
    # the left neighbour and the pixel above always feed the prediction
    h, w = shape[1:]
    q = torch.arange(h * w)
    assert seen[q[q % w > 0], q[q % w > 0] - 1].all()
    assert seen[q[q >= w], q[q >= w] - w].all()


def test_no_blind_spot_every_earlier_pixel_is_seen() -> None:
    # PixelCNN's masked convolutions miss a wedge above-right; the two streams do not. With
    # nr_resnet=2 the receptive field spans an 8x8 image (nr_resnet=1 is one column short).
    torch.manual_seed(0)
    net = PixelCNNNet(1, nr_resnet=2, nr_filters=8, nr_logistic_mix=2, dropout=0.0).double().eval()
    seen = pixels_seen(net, (1, 8, 8))
    assert torch.equal(seen, torch.ones_like(seen).tril(-1))


def test_perturbing_a_later_pixel_leaves_earlier_outputs_unchanged() -> None:
    torch.manual_seed(1)
    net = PixelCNNNet(3, nr_resnet=1, nr_filters=8, nr_logistic_mix=2, dropout=0.0).eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    y = x.clone()
    y[:, :, 4, 3] = -y[:, :, 4, 3]
    with torch.no_grad():
        a, b = net(x).flatten(2), net(y).flatten(2)
    p = 4 * 8 + 3
    assert torch.equal(a[:, :, :p + 1], b[:, :, :p + 1])
    assert not torch.allclose(a[:, :, p + 1:], b[:, :, p + 1:])


@pytest.fixture(scope="module")
def trained() -> tuple[PixelCNNPP, SplitView]:
    return fitted(epochs=4)


def test_training_lowers_bits_per_dim_on_train_data(trained: tuple[PixelCNNPP, SplitView]) -> None:
    untrained, train = fitted(epochs=0)
    det, _ = trained
    before, after = untrained.metadata()["train_bpd"], det.metadata()["train_bpd"]
    assert after < before - 0.3, (before, after)
    assert det.metadata()["epoch_train_bpd"][-1] < det.metadata()["epoch_train_bpd"][0]


def test_score_is_log_likelihood_and_metadata_bpd_agrees(trained: tuple[PixelCNNPP, SplitView]) -> None:
    det, train = trained
    scores = det.score(train)
    assert scores.dtype == np.float64 and scores.shape == (len(train),)
    assert (scores < 0).all()  # log of a probability mass
    assert det.metadata()["train_bpd"] == pytest.approx(-scores.mean() / (64 * math.log(2)), rel=1e-12)


def test_float_images_on_the_8bit_grid_score_as_their_uint8_twins(trained: tuple[PixelCNNPP, SplitView]) -> None:
    det, train = trained
    x = train.images.x[:20]
    np.testing.assert_array_equal(det.score(view("f", x.astype(np.float32) / 255)), det.score(view("u", x)))


def test_scores_finite_on_noise_and_extreme_images(trained: tuple[PixelCNNPP, SplitView]) -> None:
    det, train = trained
    rng = np.random.default_rng(0)
    cases = {
        "uniform uint8": rng.integers(0, 256, (50, 1, 8, 8), dtype=np.uint8),
        "gaussian float": np.clip(rng.normal(0.5, 1.0, (50, 1, 8, 8)), 0, 1).astype(np.float32),
        "black": np.zeros((2, 1, 8, 8), np.uint8),
        "white": np.full((2, 1, 8, 8), 255, np.uint8),
    }
    for name, x in cases.items():
        s = det.score(view(name, x))
        assert np.isfinite(s).all(), name
    # and noise is far less likely than the digits trained on
    assert det.score(view("n", cases["uniform uint8"])).max() < det.score(train).min()


def test_same_seed_same_scores_other_seed_other_scores() -> None:
    a, train = fitted(epochs=1, n=100)
    b, _ = fitted(epochs=1, n=100)
    c, _ = fitted(epochs=1, n=100, seed=1)
    np.testing.assert_array_equal(a.score(train), b.score(train))
    assert not np.allclose(a.score(train), c.score(train))


def test_config_presets_and_overrides() -> None:
    paper = PixelCNNPP(config="paper").metadata()
    assert (paper["nr_resnet"], paper["nr_filters"], paper["nr_logistic_mix"]) == (5, 160, 10)
    small = PixelCNNPP(nr_filters=7).metadata()
    assert small["nr_filters"] == 7 and small["nr_resnet"] == CONFIGS["small"]["nr_resnet"]
    with pytest.raises(PluginError):
        PixelCNNPP(config="huge")
