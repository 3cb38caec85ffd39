"""A variational autoencoder on penultimate features: the feature-GMM paper's "VAE" baseline."""
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

_LOG_2PI = math.log(2.0 * math.pi)
#: Training precision of the feature-density networks. float64 by default: float32 rounding differs between
#: CPUs (AVX2 vs AVX-512 kernels), and 30 epochs of Adam amplify it into AUROCs 0.01-0.07 apart; in float64 two
#: machines agree to ~1e-4 (BENCHMARKS.md). float32 is ~2x faster, for large runs on a GPU.
TRAINING_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SAMPLE_ROWS = 1 << 16  # (input, z-draw) pairs decoded at a time: bounds scoring memory


class Standardiser:
    """z = (x - mean) / scale per feature, fitted on the train features (float64).

    A feature whose train spread is below float32 resolution (a dead ReLU unit) keeps
    scale 1, so it is centred but not blown up. ``log_scale`` = sum_j log scale_j =
    -log|det dz/dx|: a density of z becomes one of x as log p(x) = log p(z) - log_scale.
    """

    def __init__(self, x: np.ndarray):
        x = x.astype(np.float64)
        self.mean = x.mean(0)
        std = x.std(0)
        self.constant = std <= 1e-6 * np.maximum(1.0, np.abs(self.mean))
        self.scale = np.where(self.constant, 1.0, std)
        self.log_scale = float(np.log(self.scale).sum())

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float64) - self.mean) / self.scale

    def to_state(self) -> dict[str, Any]:
        return {"mean": self.mean, "scale": self.scale, "constant": self.constant, "log_scale": self.log_scale}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Standardiser":
        """The standardiser ``to_state`` described, without the features it was fitted on."""
        standardiser = cls.__new__(cls)
        standardiser.mean, standardiser.scale = state["mean"], state["scale"]
        standardiser.constant, standardiser.log_scale = state["constant"], float(state["log_scale"])
        return standardiser


class _GaussianVAE(nn.Module):
    """q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), p(x|z) = N(m(z), diag v(z)).

    Encoder and decoder: one hidden ReLU layer each. The decoder variance is
    softplus(.) + min_var: without a floor a Gaussian decoder's likelihood is unbounded
    on point masses (dead or often-zero ReLU features).
    """

    def __init__(self, dim: int, hidden: int, latent: int, min_var: float):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 2 * dim))
        self.latent, self.min_var = latent, min_var

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_var = self.encoder(x).chunk(2, dim=-1)
        return mu, log_var

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z), summed over features; z may carry leading sample dimensions."""
        mean, raw = self.decoder(z).chunk(2, dim=-1)
        var = F.softplus(raw) + self.min_var
        return -0.5 * ((x - mean) ** 2 / var + var.log() + _LOG_2PI).sum(-1)

    def elbo(self, x: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        """E_q[log p(x|z)] - KL(q(z|x) || p(z)): reconstruction averaged over ``samples``
        reparameterised draws, KL in closed form (lower variance than sampling it)."""
        mu, log_var = self.encode(x)
        eps = torch.randn((samples, *mu.shape), generator=generator, device=x.device, dtype=x.dtype)
        z = mu + eps * (0.5 * log_var).exp()
        kl = 0.5 * (mu ** 2 + log_var.exp() - log_var - 1.0).sum(-1)
        return self.log_px_given_z(x, z).mean(0) - kl

    def log_weights(self, x: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        """log p(x, z_k) - log q(z_k|x) for k = 1..samples, z_k ~ q(z|x); shape samples x N."""
        mu, log_var = self.encode(x)
        eps = torch.randn((samples, *mu.shape), generator=generator, device=x.device, dtype=x.dtype)
        z = mu + eps * (0.5 * log_var).exp()
        log_pz = -0.5 * (z ** 2 + _LOG_2PI).sum(-1)
        log_qz = -0.5 * (eps ** 2 + log_var + _LOG_2PI).sum(-1)
        return self.log_px_given_z(x, z) + log_pz - log_qz

    def iwae(self, x: torch.Tensor, samples: int, generator: torch.Generator) -> torch.Tensor:
        """IWAE bound L_k = log (1/k) sum_k w_k (Burda et al. 2016): ELBO <= L_k <= log p(x)."""
        return torch.logsumexp(self.log_weights(x, samples, generator), 0) - math.log(samples)


class FeatureVAE(Detector):
    """Gaussian VAE on penultimate features; score = ELBO (or IWAE bound) of log p(features).

    Paper: the "VAE" baseline of "Understanding classifier mistakes with generative models"
    (ICLR 2021 submission, Sec. 4 and App. C); VAE of Kingma & Welling (2014).
    Model: features are standardised with the train split's per-feature mean and std
    (dead features keep scale 1); q(z|x) and p(x|z) are diagonal Gaussians, each an MLP
    with one hidden ReLU layer of ``hidden`` units; latent dimension ``latent``; prior
    N(0, I); decoder variance softplus(.) + ``min_var`` (standardised units) so the density
    stays bounded on point masses. Trained on the train split by Adam on the one-sample
    reparameterised negative ELBO (closed-form KL), learning rate multiplied by
    ``lr_decay`` after every epoch.

    score(x) = ELBO(s(x)) - sum_j log scale_j, a lower bound on log p(x) in the original
    feature units (the second term is the standardisation's log-Jacobian), where
    ELBO = mean over ``elbo_samples`` draws of log p(s(x)|z) - KL(q(z|s(x)) || N(0, I)).
    With ``iwae_samples`` = k >= 1 the ELBO is replaced by the tighter IWAE bound L_k
    (Burda et al. 2016). Higher = more trustworthy. Every ``score`` call draws z from a
    fresh generator seeded from ``seed``, so scoring the same inputs twice gives identical
    scores. float64 scores (the trained network is evaluated in float64); a non-finite
    score raises PluginError.
    Needs: logits (for the contract), features. Fit: train split; val only for metadata.
    Metadata: final_train_loss (the last epoch's mean training loss, in standardised
    units, so it omits the log-Jacobian), epochs, mean_train_score, mean_val_score,
    constant_features (how many features the standardisation found constant) and bound
    (which bound the scores are: elbo_<samples> or iwae_<k>).

    Defaults: hidden=512, latent=128 (paper), epochs=30, batch_size=128, lr=1e-3,
    lr_decay=0.9995, elbo_samples=8, iwae_samples=0 (ELBO), min_var=1e-4, dtype="float64"
    (training precision; see ``TRAINING_DTYPES``).
    Paper-scale: epochs=1000 (lr 1e-3, decay 0.9995, Adam, as in App. C).
    Deviations: the paper does not give the batch size, the decoder's likelihood, the
    variance floor, how the decay is applied or how scores are estimated: the choices
    above are ours. 30 epochs (not 1000) keep the default digits run to a couple of seconds.
    """

    name = "vae"
    needs = frozenset({"logits", "features"})

    def __init__(
        self,
        *,
        hidden: int = 512,
        latent: int = 128,
        epochs: Annotated[int, Field(ge=1)] = 30,
        batch_size: int = 128,
        lr: float = 1e-3,
        lr_decay: float = 0.9995,
        elbo_samples: int = 8,
        iwae_samples: int = 0,
        min_var: float = 1e-4,
        seed: int = 0,
        dtype: str = "float64",
    ):
        for option, value in (("hidden", hidden), ("latent", latent), ("epochs", epochs),
                              ("batch_size", batch_size), ("elbo_samples", elbo_samples)):
            if value < 1:
                raise PluginError(f"vae: {option} must be >= 1, got {value}")
        if iwae_samples < 0:
            raise PluginError(f"vae: iwae_samples must be >= 0 (0 = score with the ELBO), got {iwae_samples}")
        if lr <= 0 or not 0 < lr_decay <= 1 or min_var <= 0:
            raise PluginError(f"vae: need lr > 0, 0 < lr_decay <= 1, min_var > 0; got {lr}, {lr_decay}, {min_var}")
        self.hidden, self.latent, self.epochs, self.batch_size = hidden, latent, epochs, batch_size
        self.lr, self.lr_decay, self.min_var, self.seed = lr, lr_decay, min_var, seed
        self.elbo_samples, self.iwae_samples = elbo_samples, iwae_samples
        if dtype not in TRAINING_DTYPES:
            raise PluginError(f"vae: dtype must be one of {sorted(TRAINING_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self._meta: dict[str, Any] = {}

    def fit(self, ctx: FitContext) -> None:
        self.device = ctx.device
        self.standardiser = Standardiser(ctx.train.features)
        x = torch.from_numpy(self.standardiser(ctx.train.features)).to(self.device, TRAINING_DTYPES[self.dtype])
        with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching global state
            torch.default_generator.manual_seed(self.seed)
            net = _GaussianVAE(x.shape[1], self.hidden, self.latent, self.min_var).to(self.device, x.dtype)
        order = torch.Generator().manual_seed(self.seed)
        noise = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=self.lr_decay)
        net.train()
        for epoch in range(self.epochs):
            total = 0.0
            for batch in torch.randperm(len(x), generator=order).split(self.batch_size):
                loss = -net.elbo(x[batch.to(self.device)], 1, noise).mean()
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += loss.item() * len(batch)
            if not math.isfinite(total):
                raise PluginError(f"vae: training loss became non-finite at epoch {epoch + 1}; try a smaller lr")
            schedule.step()
            ctx.progress(f"vae epoch {epoch + 1}/{self.epochs}: loss {total / len(x):.4f}")
        self.net = net.double().eval()  # scores in float64 whatever the training precision
        self._meta = {
            "final_train_loss": total / len(x),
            "epochs": self.epochs,
            "bound": f"iwae_{self.iwae_samples}" if self.iwae_samples else f"elbo_{self.elbo_samples}",
            "constant_features": int(self.standardiser.constant.sum()),
            "mean_train_score": float(self.score(ctx.train).mean()),
            "mean_val_score": float(self.score(ctx.val).mean()),
        }

    def state_dict(self) -> dict[str, Any]:
        # The scoring network (float64), the standardisation and the metadata; the optimiser's state is not needed to score.
        return {**with_prefix(self.standardiser.to_state(), "standardiser."),
                **with_prefix(module_arrays(self.net), "net."), "metadata": dict(self._meta)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.device = device_of(ctx)
        self.standardiser = Standardiser.from_state(under_prefix(state, "standardiser."))
        net = build_unseeded(lambda: _GaussianVAE(len(self.standardiser.mean), self.hidden, self.latent, self.min_var))
        self.net = load_module_arrays(net.double(), under_prefix(state, "net.")).to(self.device).eval()
        self._meta = dict(state["metadata"])

    @torch.no_grad()
    def score(self, view: SplitView) -> np.ndarray:
        x = torch.from_numpy(self.standardiser(view.features)).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 2)
        samples = self.iwae_samples or self.elbo_samples
        bound = []
        for chunk in x.split(max(1, _SAMPLE_ROWS // samples)):
            if self.iwae_samples:
                bound.append(self.net.iwae(chunk, self.iwae_samples, generator))
            else:
                bound.append(self.net.elbo(chunk, self.elbo_samples, generator))
        scores = (torch.cat(bound).cpu().numpy() if bound else np.empty(0)) - self.standardiser.log_scale
        if not np.isfinite(scores).all():
            bad = int((~np.isfinite(scores)).sum())
            raise PluginError(f"vae: {bad} of {len(scores)} scores of {view.name} are not finite "
                              "(non-finite features, or a diverged model)")
        return scores.astype(np.float64)

    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)
