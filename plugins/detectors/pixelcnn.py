"""PixelCNN++ on raw pixels (Salimans, Karpathy, Chen & Kingma, ICLR 2017).

The feature-GMM paper's model-agnostic baseline, and the Generative Ensembles paper's
density model on pixels: an autoregressive likelihood p(x) = prod_i p(x_i | x_<i) in raster
order, each factor a discretized mixture of logistics over the 256 pixel levels.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from oodbench.api import Detector, FitContext, PluginError, SplitView

from .stored import build_unseeded, device_of, load_module_arrays, module_arrays, under_prefix, with_prefix

#: Named hyperparameter sets; explicit options override them.
CONFIGS: dict[str, dict[str, Any]] = {
    # Trains in seconds on 2 CPU cores on the 1,078 8x8 digits of the default benchmark.
    "small": dict(nr_resnet=1, nr_filters=16, nr_logistic_mix=5, epochs=8, batch_size=64, lr=4e-3, dropout=0.0),
    # The authors' CIFAR-10 model (their train.py defaults); for GPUs. The authors trained far
    # longer (days on 8 GPUs): raise `epochs` for a converged model.
    "paper": dict(nr_resnet=5, nr_filters=160, nr_logistic_mix=10, epochs=100, batch_size=16, lr=1e-3, dropout=0.5),
}
#: Per-step exponential learning-rate decay of the authors' train.py.
LR_DECAY = 0.999995


# --------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------
def num_params(channels: int, nr_mix: int) -> int:
    """Network outputs per pixel: mixture logits, then per channel means and log-scales, then
    one coefficient per (channel, earlier channel) pair (10 * nr_mix for RGB, as in the paper)."""
    return nr_mix * (1 + 2 * channels + channels * (channels - 1) // 2)


def discretized_logistic_mix_log_prob(x: torch.Tensor, params: torch.Tensor, nr_mix: int, bins: int = 256) -> torch.Tensor:
    """log P(x) at every pixel under a mixture of discretized logistics, shape (N, H, W).

    ``x`` (N, C, H, W) holds values on the grid -1 + 2k/(bins-1), k = 0..bins-1 (the paper's
    uint8 -> [-1, 1] with bins = 256); ``params`` (N, num_params(C, nr_mix), H, W) are the
    network outputs. Component k gives channel c a logistic with mean
    mu_kc + sum_{d<c} tanh(alpha_kcd) x_d (the paper's linear dependence of a sub-pixel on the
    earlier ones; for one channel, the plain mixture) and scale exp(max(log s_kc, -7)); a bin's
    mass is the CDF difference over [x - 1/(bins-1), x + 1/(bins-1)], with the outer bins
    extended to -inf / +inf, so the masses of the ``bins`` levels sum to exactly 1.
    The mass is computed in log space, log(sig(a) - sig(b)) = log sig(a) + log sig(-b)
    + log(1 - e^(b-a)): exact everywhere, where the authors' code falls back to a midpoint
    density approximation when the mass is below 1e-5.
    """
    n, c, h, w = x.shape
    k = nr_mix
    logits = params[:, :k]
    means = params[:, k:k + c * k].reshape(n, c, k, h, w)
    log_scales = params[:, k + c * k:k + 2 * c * k].reshape(n, c, k, h, w).clamp(min=-7.0)
    coeffs = torch.tanh(params[:, k + 2 * c * k:]).reshape(n, c * (c - 1) // 2, k, h, w)
    x = x.unsqueeze(2)
    shifted, pair = [means[:, 0]], 0
    for ch in range(1, c):
        mean = means[:, ch]
        for earlier in range(ch):
            mean = mean + coeffs[:, pair] * x[:, earlier]
            pair += 1
        shifted.append(mean)
    means = torch.stack(shifted, 1)

    half = 1.0 / (bins - 1)
    inv_scale = torch.exp(-log_scales)
    upper = inv_scale * (x - means + half)
    lower = inv_scale * (x - means - half)
    log_upper_cdf = F.logsigmoid(upper)  # mass of (-inf, x + half]: the lowest level
    log_lower_survival = F.logsigmoid(-lower)  # mass of [x - half, +inf): the highest level
    log_bin = log_upper_cdf + log_lower_survival + torch.log(-torch.expm1(-2.0 * half * inv_scale))
    log_probs = torch.where(x < -1.0 + half, log_upper_cdf, torch.where(x > 1.0 - half, log_lower_survival, log_bin))
    return torch.logsumexp(log_probs.sum(1) + F.log_softmax(logits, 1), 1)


# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------
def concat_elu(x: torch.Tensor) -> torch.Tensor:
    return F.elu(torch.cat([x, -x], 1))


def down_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def right_shift(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 0))[:, :, :, :-1]


class DownShiftedConv(nn.Module):
    """Convolution whose output at row r sees input rows <= r only (padding above, centred across)."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, int] = (2, 3), stride: int = 1):
        super().__init__()
        self.pad = ((size[1] - 1) // 2, (size[1] - 1) // 2, size[0] - 1, 0)
        self.conv = nn.Conv2d(c_in, c_out, size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class DownRightShiftedConv(nn.Module):
    """Convolution whose output at (r, c) sees input rows <= r and columns <= c only."""

    def __init__(self, c_in: int, c_out: int, size: tuple[int, int] = (2, 2), stride: int = 1):
        super().__init__()
        self.pad = (size[1] - 1, 0, size[0] - 1, 0)
        self.conv = nn.Conv2d(c_in, c_out, size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class ShiftedDeconv(nn.Module):
    """Stride-2 transposed convolution, cropped so the causal alignment of its conv twin holds.

    ``right``: the down-right-shifted variant (crop on the right) instead of the down-shifted
    one (centred crop). The result is cropped to ``like``'s size, so odd sizes work too.
    """

    def __init__(self, filters: int, size: tuple[int, int], right: bool):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(filters, filters, size, 2, output_padding=1)
        self.left = 0 if right else (size[1] - 1) // 2

    def forward(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        h, w = like.shape[2:]
        return self.deconv(x)[:, :, :h, self.left:self.left + w]


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), [a, b] = conv(concat_elu(conv(concat_elu(x)) + nin(concat_elu(aux))))."""

    def __init__(self, filters: int, conv: type[nn.Module], aux_streams: int, dropout: float):
        super().__init__()
        self.conv1 = conv(2 * filters, filters)
        self.aux = nn.Conv2d(2 * aux_streams * filters, filters, 1) if aux_streams else None
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(2 * filters, 2 * filters)
        with torch.no_grad():  # the authors initialise this layer at scale 0.1: blocks start near identity
            self.conv2.conv.weight.mul_(0.1)

    def forward(self, x: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(concat_elu(x))
        if self.aux is not None:
            h = h + self.aux(concat_elu(aux))
        a, b = self.conv2(self.dropout(concat_elu(h))).chunk(2, 1)
        return x + a * torch.sigmoid(b)


class PixelCNNNet(nn.Module):
    """The PixelCNN++ network: maps images in [-1, 1] to mixture parameters at every pixel.

    Two streams, u (pixels above) and ul (above and to the left), run up through three
    resolutions (nr_resnet gated resnet blocks each, stride-2 shifted convolutions between)
    and back down (nr_resnet, then nr_resnet + 1 blocks per resolution), the down pass
    taking every up-pass output as a skip connection, as in the authors' model.py.
    """

    scales = 3

    def __init__(self, channels: int, nr_resnet: int, nr_filters: int, nr_logistic_mix: int, dropout: float):
        super().__init__()
        f, s = nr_filters, self.scales
        self.u_init = DownShiftedConv(channels + 1, f, (2, 3))
        self.ul_init_above = DownShiftedConv(channels + 1, f, (1, 3))
        self.ul_init_left = DownRightShiftedConv(channels + 1, f, (2, 1))

        def blocks(n: int, conv: type[nn.Module], aux: int) -> nn.ModuleList:
            return nn.ModuleList(GatedResnet(f, conv, aux, dropout) for _ in range(n))

        self.up_u = nn.ModuleList(blocks(nr_resnet, DownShiftedConv, 0) for _ in range(s))
        self.up_ul = nn.ModuleList(blocks(nr_resnet, DownRightShiftedConv, 1) for _ in range(s))
        self.downsize_u = nn.ModuleList(DownShiftedConv(f, f, (2, 3), 2) for _ in range(s - 1))
        self.downsize_ul = nn.ModuleList(DownRightShiftedConv(f, f, (2, 2), 2) for _ in range(s - 1))
        depth = [nr_resnet] + [nr_resnet + 1] * (s - 1)
        self.down_u = nn.ModuleList(blocks(d, DownShiftedConv, 1) for d in depth)
        self.down_ul = nn.ModuleList(blocks(d, DownRightShiftedConv, 2) for d in depth)
        self.upsize_u = nn.ModuleList(ShiftedDeconv(f, (2, 3), right=False) for _ in range(s - 1))
        self.upsize_ul = nn.ModuleList(ShiftedDeconv(f, (2, 2), right=True) for _ in range(s - 1))
        self.out = nn.Conv2d(f, num_params(channels, nr_logistic_mix), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a channel of ones tells the zero padding of the shifted convolutions from black pixels
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        u = down_shift(self.u_init(x))
        ul = down_shift(self.ul_init_above(x)) + right_shift(self.ul_init_left(x))
        us, uls = [u], [ul]
        for scale in range(self.scales):
            for block_u, block_ul in zip(self.up_u[scale], self.up_ul[scale]):
                u = block_u(u)
                ul = block_ul(ul, u)
                us.append(u)
                uls.append(ul)
            if scale < self.scales - 1:
                u, ul = self.downsize_u[scale](u), self.downsize_ul[scale](ul)
                us.append(u)
                uls.append(ul)
        u, ul = us.pop(), uls.pop()
        for scale in range(self.scales):
            if scale:
                u = self.upsize_u[scale - 1](u, us[-1])
                ul = self.upsize_ul[scale - 1](ul, uls[-1])
            for block_u, block_ul in zip(self.down_u[scale], self.down_ul[scale]):
                u = block_u(u, us.pop())
                ul = block_ul(ul, torch.cat([u, uls.pop()], 1))
        return self.out(F.elu(ul))


# --------------------------------------------------------------------------------------
# Detector
# --------------------------------------------------------------------------------------
def to_levels(images: np.ndarray) -> np.ndarray:
    """Images in [0, 1] (uint8 or float32) as uint8 levels 0..255; float images are rounded."""
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint(images.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


class PixelCNNPP(Detector):
    """PixelCNN++ log-likelihood of the raw image (Salimans et al. 2017); a small one unless config="paper".

    Paper: Salimans, Karpathy, Chen, Kingma, "PixelCNN++: Improving the PixelCNN with
    discretized logistic mixture likelihood and other modifications", ICLR 2017; used as the
    model-agnostic baseline of the feature-GMM paper and as the pixel density model of
    Generative Ensembles (WAIC). The default ``config="small"`` is a small PixelCNN++ (1 resnet
    block per resolution, 16 filters, 8 epochs) that trains in seconds on the digits: rows of
    ``pixelcnn`` say which ran in ``detector_options``.

    Score: score(x) = log p(x) in nats, the exact discrete log-likelihood of the 8-bit image,
    sum over pixels and channels of log P(x_i | x_<i) (raster order; sub-pixels of a pixel in
    channel order). Higher = more trustworthy. bits/dim = -score / (C*H*W*ln 2) is reported in
    metadata (train_bpd, val_bpd). Images are mapped uint8 -> [-1, 1] as in the paper; float
    images are first rounded to the nearest of the 256 levels.

    Model: discretized logistic mixture likelihood (with the per-channel linear dependence of
    sub-pixels, generalised to C channels: one coefficient per earlier channel; for 1-channel
    images the plain mixture), down-shifted / down-right-shifted convolutions, gated resnet
    blocks with concat_elu, the two-stream U-net (3 resolutions, nr_resnet blocks per
    resolution up, nr_resnet and nr_resnet + 1 down, skip connections). Trained by Adam on the
    mean negative log-likelihood, learning rate decayed by 0.999995 per step (the authors').

    Needs: images (and logits, which every view carries). Uses ``ctx.device``.
    Options: ``config`` ("small", default: nr_resnet=1, nr_filters=16, nr_logistic_mix=5,
    epochs=8, batch_size=64, lr=4e-3, dropout=0 -- about 10 s on 2 CPU cores for the 1,078
    8x8 digits of the default benchmark, ~3.6 bits/dim;
    "paper": nr_resnet=5, nr_filters=160, nr_logistic_mix=10, batch_size=16, lr=1e-3,
    dropout=0.5, epochs=100, for GPUs; 53,618,660 parameters on RGB: the authors' model's 53,659,080
    less its 40,420 weight-norm gains, plugins/tests/test_pixelcnn_paper_config.py; the paper benchmark files run
    it with the feature-GMM paper's lr 1e-4 and dropout 0.5, shortened from its 5,000 epochs);
    ``nr_resnet``, ``nr_filters``, ``nr_logistic_mix``,
    ``epochs``, ``batch_size``, ``lr``, ``dropout`` override the config when given; ``seed``
    (initialisation, shuffling, dropout).

    Deviations from the paper (explicit): plain convolutions instead of weight normalisation
    with data-dependent initialisation (PyTorch default init, the second convolution of each
    gated resnet scaled by 0.1 as the authors' init_scale); no Polyak averaging of the
    weights; the bin mass is computed exactly in log space (see
    ``discretized_logistic_mix_log_prob``) instead of the authors' 1e-5 fallback;
    fewer epochs than the authors' multi-day schedule unless ``epochs`` is raised. With
    nr_resnet=1 the receptive field is narrow: on 8x8 images the prediction at (1, 0) does not
    reach pixel (0, 7) (nr_resnet >= 2 covers every earlier pixel of an 8x8 image).
    """

    name = "pixelcnn"
    needs = frozenset({"logits", "images"})

    def __init__(
        self,
        *,
        config: str = "small",
        nr_resnet: int | None = None,
        nr_filters: int | None = None,
        nr_logistic_mix: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        dropout: float | None = None,
        seed: int = 0,
    ):
        if config not in CONFIGS:
            raise PluginError(f"pixelcnn: config must be one of {sorted(CONFIGS)}, got {config!r}")
        given = dict(nr_resnet=nr_resnet, nr_filters=nr_filters, nr_logistic_mix=nr_logistic_mix,
                     epochs=epochs, batch_size=batch_size, lr=lr, dropout=dropout)
        self.config = config
        self.hparams = {key: CONFIGS[config][key] if value is None else value for key, value in given.items()}
        self.seed = seed
        self.net: PixelCNNNet | None = None
        self.device = torch.device("cpu")
        self.stats: dict[str, Any] = {}

    def fit(self, ctx: FitContext) -> None:
        hp = self.hparams
        levels = to_levels(ctx.train.images.x)
        channels = levels.shape[1]
        self.device = ctx.device
        devices = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # seed init and dropout without touching the caller's RNG
            torch.manual_seed(self.seed)
            net = PixelCNNNet(channels, hp["nr_resnet"], hp["nr_filters"], hp["nr_logistic_mix"], hp["dropout"])
            self.net = net.to(ctx.device)
            shuffle = torch.Generator().manual_seed(self.seed)
            data = torch.tensor(levels, device=ctx.device)  # a copy: images are read-only
            optimizer = torch.optim.Adam(net.parameters(), lr=hp["lr"])
            schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, LR_DECAY)
            dims = math.prod(levels.shape[1:])
            epoch_bpd = []
            net.train()
            for epoch in range(hp["epochs"]):
                total = 0.0
                for index in torch.randperm(len(data), generator=shuffle).split(hp["batch_size"]):
                    batch = data[index.to(ctx.device)].float() / 127.5 - 1.0
                    log_lik = discretized_logistic_mix_log_prob(batch, net(batch), hp["nr_logistic_mix"]).sum((1, 2))
                    loss = -log_lik.mean() / dims
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    total += loss.item() * len(index)
                epoch_bpd.append(total / len(data) / math.log(2))
                ctx.progress(f"pixelcnn epoch {epoch + 1}/{hp['epochs']}: {epoch_bpd[-1]:.3f} bits/dim")
        net.eval()
        self.stats = {
            "epoch_train_bpd": epoch_bpd,
            "train_bpd": self.bits_per_dim(ctx.train),
            "val_bpd": self.bits_per_dim(ctx.val),
            "parameters": sum(p.numel() for p in net.parameters()),
        }

    def state_dict(self) -> dict[str, Any]:
        if self.net is None:
            raise PluginError("pixelcnn: state_dict called before fit")
        channels = self.net.u_init.conv.in_channels - 1  # the network adds a channel of ones
        return {**with_prefix(module_arrays(self.net), "net."), "channels": channels, "stats": dict(self.stats)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        hp = self.hparams
        net = build_unseeded(lambda: PixelCNNNet(int(state["channels"]), hp["nr_resnet"], hp["nr_filters"],
                                                 hp["nr_logistic_mix"], hp["dropout"]))
        self.device = device_of(ctx)
        self.net = load_module_arrays(net, under_prefix(state, "net.")).to(self.device).eval()
        self.stats = dict(state["stats"])

    def log_likelihood(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """log p(x) in nats of each image (NCHW in [0, 1], uint8 or float32), float64."""
        if self.net is None:
            raise PluginError("pixelcnn: score called before fit")
        levels = to_levels(images)
        out = []
        with torch.inference_mode():
            for start in range(0, len(levels), batch_size):
                batch = torch.tensor(levels[start:start + batch_size], device=self.device).float() / 127.5 - 1.0
                log_p = discretized_logistic_mix_log_prob(batch, self.net(batch), self.hparams["nr_logistic_mix"])
                out.append(log_p.double().sum((1, 2)).cpu().numpy())
        return np.concatenate(out) if out else np.empty(0)

    def bits_per_dim(self, view: SplitView) -> float:
        x = view.images.x
        return float(-self.log_likelihood(x).mean() / (math.prod(x.shape[1:]) * math.log(2)))

    def score(self, view: SplitView) -> np.ndarray:
        return self.log_likelihood(view.images.x)

    def metadata(self) -> dict[str, Any]:
        return {"config": self.config, **self.hparams, **self.stats, "score": "log-likelihood (nats)"}
