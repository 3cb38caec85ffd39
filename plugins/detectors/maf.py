"""A masked autoregressive flow on penultimate features: the feature-GMM paper's "MAF"/"MADE" baseline."""
from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from oodbench.api import Detector, FitContext, PluginError, SplitView

from .stored import build_unseeded, device_of, load_module_arrays, module_arrays, under_prefix, with_prefix
from .vae import TRAINING_DTYPES, Standardiser

_LOG_2PI = math.log(2.0 * math.pi)
_CHUNK = 8192  # rows scored at a time


class _MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out x in)."""

    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class _MADE(nn.Module):
    """One MAF layer (Papamakarios et al. 2017, Sec. 3): u_i = (x_i - mu_i(x_<i)) exp(-alpha_i(x_<i)).

    mu and alpha come from a MADE (Germain et al. 2015) with the natural input order:
    input i has degree i, hidden units get degrees 1..D-1 cyclically, a hidden unit sees
    inputs of degree <= its own and output i sees hidden units of degree < i. alpha is
    softly bounded to (-bound, bound) so the density stays finite on point masses.
    The output layer starts at zero, so an untrained layer is the identity.
    """

    def __init__(self, dim: int, hidden: int, hidden_layers: int, bound: float):
        super().__init__()
        degree_in = torch.arange(1, dim + 1)
        degree_hidden = torch.arange(hidden) % max(dim - 1, 1) + 1
        layers: list[nn.Module] = []
        previous = degree_in
        for _ in range(hidden_layers):
            layers += [_MaskedLinear(len(previous), hidden, degree_hidden[:, None] >= previous[None, :]), nn.ReLU()]
            previous = degree_hidden
        out = _MaskedLinear(len(previous), 2 * dim, (degree_in[:, None] > previous[None, :]).repeat(2, 1))
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        self.bound = bound

    def shift_and_log_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, raw = self.net(x).chunk(2, dim=-1)
        return mu, self.bound * torch.tanh(raw / self.bound)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, log|det du/dx|): the Jacobian is triangular with diagonal exp(-alpha)."""
        mu, alpha = self.shift_and_log_scale(x)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(-1)


class _BatchNormFlow(nn.Module):
    """Batch norm as a bijection (Papamakarios et al. 2017, Sec. 3.4):
    u = (x - m) / sqrt(v + eps) * exp(log_gamma) + beta. Batch statistics while training;
    running ones otherwise (set to the whole train split's at the end of training).
    log_gamma is bounded like the MADE's alpha: on a constant feature x - m is 0 whatever
    gamma is, so an unbounded log_gamma would grow for as long as training runs."""

    def __init__(self, dim: int, bound: float, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.raw_log_gamma = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))
        self.bound, self.momentum, self.eps = bound, momentum, eps

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        log_gamma = self.bound * torch.tanh(self.raw_log_gamma / self.bound)
        u = (x - mean) * torch.rsqrt(var + self.eps) * log_gamma.exp() + self.beta
        log_det = (log_gamma - 0.5 * torch.log(var + self.eps)).sum()
        return u, log_det.expand(len(x))


class _MAF(nn.Module):
    """MADE layers with the variable order reversed after each (optionally batch norm between
    them), standard normal base: log p(x) = log N(u; 0, I) + sum of the layers' log-dets."""

    def __init__(self, dim: int, layers: int, hidden: int, hidden_layers: int, batch_norm: bool, bound: float):
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks.append(_MADE(dim, hidden, hidden_layers, bound))
            if batch_norm and i < layers - 1:
                blocks.append(_BatchNormFlow(dim, bound))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u, log|det du/dx|) of the whole flow."""
        log_det = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for block in self.blocks:
            x, block_log_det = block(x)
            log_det = log_det + block_log_det
            if isinstance(block, _MADE):
                x = x.flip(-1)  # reversal has |det| = 1
        return x, log_det

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        u, log_det = self(x)
        return -0.5 * (u ** 2 + _LOG_2PI).sum(-1) + log_det

    @torch.no_grad()
    def set_batch_norm_statistics(self, x: torch.Tensor) -> None:
        """Give every batch-norm layer the exact statistics of ``x`` as it reaches that layer."""
        norms = [b for b in self.blocks if isinstance(b, _BatchNormFlow)]
        self.eval()
        if not norms:
            return
        momenta = [b.momentum for b in norms]
        for b in norms:
            b.momentum = 1.0
        self.train()
        self(x)
        for b, momentum in zip(norms, momenta):
            b.momentum = momentum
        self.eval()


class FeatureMAF(Detector):
    """Masked autoregressive flow on penultimate features; score = exact log p(features).

    Paper: the "MAF" baseline (plotted as "MADE") of "Understanding classifier mistakes with
    generative models" (ICLR 2021 submission, Sec. 4 and App. C); MAF of Papamakarios,
    Pavlakou & Murray (NeurIPS 2017), MADE of Germain et al. (ICML 2015).
    Model: features are standardised with the train split's per-feature mean and std
    (dead features keep scale 1). ``layers`` MAF layers, each u_i = (x_i - mu_i(x_<i))
    exp(-alpha_i(x_<i)) with mu, alpha from a MADE with ``hidden_layers`` masked hidden
    ReLU layers of ``hidden`` units; the variable order is reversed between layers;
    optional batch-norm bijections between layers (``batch_norm``, as in Papamakarios et al.;
    off by default); standard normal base. alpha = b tanh(raw / b) with b =
    ``max_log_scale``, a smooth bound we add so the density stays finite on point masses
    (dead or often-zero ReLU features); batch norm's log-gamma gets the same bound.
    Trained on the train split by Adam on the mean negative log-likelihood.

    score(x) = log p(s(x)) - sum_j log scale_j, the exact log-density of x in the original
    feature units (the second term is the standardisation's log-Jacobian). Higher = more
    trustworthy. Deterministic given ``seed``. float64 scores; a non-finite score raises
    PluginError. Needs: logits (for the contract), features. Fit: train split; val only
    for metadata.
    Metadata: final_train_loss (the last epoch's mean training loss, in standardised
    units, so it omits the log-Jacobian), epochs, mean_train_score, mean_val_score and
    constant_features (how many features the standardisation found constant).

    Defaults: layers=5, hidden=128 (paper), hidden_layers=1, batch_norm=False, epochs=30,
    batch_size=128, lr=1e-3, max_log_scale=3.0, dtype="float64" (training precision; see vae.py's
    ``TRAINING_DTYPES``).
    Paper-scale: epochs=1000, batch_size=32, lr=0.01 (App. C).
    Deviations: App. C says "a 5-layer MADE model with hidden layer size of 128"; we read
    it as 5 MAF layers of one MADE each, and it does not say how many hidden layers a MADE
    has (Papamakarios et al. used 2 on UCI data; we default to 1) or whether batch norm was
    used. The bounds on alpha and log-gamma are ours. Defaults of 30 epochs, batch 128, lr 1e-3 (not 1000,
    32, 0.01) keep the default digits run to a few seconds.
    """

    name = "maf"
    needs = frozenset({"logits", "features"})

    def __init__(
        self,
        *,
        layers: int = 5,
        hidden: int = 128,
        hidden_layers: int = 1,
        batch_norm: bool = False,
        epochs: Annotated[int, Field(ge=1)] = 30,
        batch_size: int = 128,
        lr: float = 1e-3,
        max_log_scale: float = 3.0,
        seed: int = 0,
        dtype: str = "float64",
    ):
        for option, value in (("layers", layers), ("hidden", hidden), ("hidden_layers", hidden_layers),
                              ("epochs", epochs), ("batch_size", batch_size)):
            if value < 1:
                raise PluginError(f"maf: {option} must be >= 1, got {value}")
        if lr <= 0 or max_log_scale <= 0:
            raise PluginError(f"maf: lr and max_log_scale must be > 0, got {lr}, {max_log_scale}")
        if batch_norm and batch_size < 2:
            raise PluginError("maf: batch_norm needs batch_size >= 2")
        self.layers, self.hidden, self.hidden_layers, self.batch_norm = layers, hidden, hidden_layers, batch_norm
        self.epochs, self.batch_size, self.lr, self.max_log_scale = epochs, batch_size, lr, max_log_scale
        self.seed = seed
        if dtype not in TRAINING_DTYPES:
            raise PluginError(f"maf: dtype must be one of {sorted(TRAINING_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._meta: dict[str, Any] = {}

    def fit(self, ctx: FitContext) -> None:
        self.device = ctx.device
        if self.batch_norm and len(ctx.train) < 2:
            raise PluginError("maf: batch_norm needs at least 2 train inputs")
        self.standardiser = Standardiser(ctx.train.features)
        x = torch.from_numpy(self.standardiser(ctx.train.features)).to(self.device, TRAINING_DTYPES[self.dtype])
        with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching global state
            torch.default_generator.manual_seed(self.seed)
            flow = _MAF(x.shape[1], self.layers, self.hidden, self.hidden_layers,
                        self.batch_norm, self.max_log_scale).to(self.device, x.dtype)
        order = torch.Generator().manual_seed(self.seed)
        optimiser = torch.optim.Adam(flow.parameters(), lr=self.lr)
        flow.train()
        for epoch in range(self.epochs):
            total, seen = 0.0, 0
            for batch in torch.randperm(len(x), generator=order).split(self.batch_size):
                if self.batch_norm and len(batch) < 2:
                    continue  # a batch of one has no variance to normalise by
                loss = -flow.log_prob(x[batch.to(self.device)]).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total, seen = total + loss.item() * len(batch), seen + len(batch)
            if not math.isfinite(total):
                raise PluginError(f"maf: training loss became non-finite at epoch {epoch + 1}; try a smaller lr")
            ctx.progress(f"maf epoch {epoch + 1}/{self.epochs}: loss {total / seen:.4f}")
        self.flow = flow.double()  # scores in float64 whatever the training precision
        self.flow.set_batch_norm_statistics(x.double())
        self._meta = {
            "final_train_loss": total / seen,
            "epochs": self.epochs,
            "constant_features": int(self.standardiser.constant.sum()),
            "mean_train_score": float(self.score(ctx.train).mean()),
            "mean_val_score": float(self.score(ctx.val).mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        # The flow in float64 (MADE masks and batch-norm statistics included), the standardisation, the metadata.
        return {**with_prefix(self.standardiser.to_state(), "standardiser."),
                **with_prefix(module_arrays(self.flow), "flow."), "metadata": dict(self._meta)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.device = device_of(ctx)
        self.standardiser = Standardiser.from_state(under_prefix(state, "standardiser."))
        flow = build_unseeded(lambda: _MAF(len(self.standardiser.mean), self.layers, self.hidden, self.hidden_layers,
                                           self.batch_norm, self.max_log_scale))
        self.flow = load_module_arrays(flow.double(), under_prefix(state, "flow.")).to(self.device).eval()
        self._meta = dict(state["metadata"])

    @torch.no_grad()
    def score(self, view: SplitView) -> np.ndarray:
        x = torch.from_numpy(self.standardiser(view.features)).to(self.device)
        log_p = [self.flow.log_prob(chunk) for chunk in x.split(_CHUNK)]
        scores = (torch.cat(log_p).cpu().numpy() if log_p else np.empty(0)) - self.standardiser.log_scale
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).sum())
            raise PluginError(f"maf: {bad} of {len(scores)} scores of {view.name} are not finite "
                              "(non-finite features, or a diverged model)")
        return scores.astype(np.float64)

    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)
