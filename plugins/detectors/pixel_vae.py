"""A variational autoencoder on binarised pixels: the likelihood model of Generative Ensembles on MNIST."""
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
from .vae import TRAINING_DTYPES, _GaussianVAE

_SAMPLE_ROWS = 1 << 15  # (image, z-draw) pairs decoded at a time: bounds scoring memory


def binarise(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """uint8 (or [0, 1] float) images N x C x H x W -> float64 N x (C H W) of 0/1: a pixel is 1 when its
    intensity exceeds ``threshold`` of full scale (static binarisation)."""
    scaled = images.astype(np.float64) / 255.0 if images.dtype == np.uint8 else images.astype(np.float64)
    return (scaled.reshape(len(images), -1) > threshold).astype(np.float64)


class _BernoulliVAE(_GaussianVAE):
    """q(z|x) = N(mu(x), diag sigma^2(x)), p(z) = N(0, I), p(x|z) = prod_d Bernoulli(x_d; sigmoid(l_d(z))).

    The ELBO and IWAE bound of ``_GaussianVAE`` with a Bernoulli decoder: one hidden ReLU layer
    each way, the decoder giving one logit per pixel."""

    def __init__(self, dim: int, hidden: int, latent: int):
        super().__init__(dim, hidden, latent, min_var=1.0)  # min_var: unused by a Bernoulli decoder
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) = sum_d x_d log s(l_d) + (1 - x_d) log(1 - s(l_d)); z may carry leading sample dimensions."""
        logits, x = torch.broadcast_tensors(self.decoder(z), x)
        return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


class PixelVAE(Detector):
    """VAE on binarised pixels, Generative Ensembles' MNIST model (Choi & Jang 2018); score = 16-sample IWAE bound.

    Paper: Choi, Jang & Alemi, "WAIC, but Why? Generative Ensembles for Robust Anomaly
    Detection" (arXiv 1810.01392), Section 4: "For MNIST and Fashion MNIST datasets, we use a
    VAE to predict a 16-sample Importance Weighted AutoEncoder (IWAE) bound", extended from
    TensorFlow Probability's VAE example and "trained for 5k steps" with Adam and cosine
    learning-rate decay. Used alone, and as ``waic``'s members (``member="pixel-vae"``) in the
    MNIST paper benchmark. VAE of Kingma & Welling (2014); IWAE of Burda et al. (2016).
    Model: pixels binarised at half intensity (x_d = 1 if intensity > 0.5), all channels
    flattened; q(z|x) a diagonal Gaussian and p(x|z) independent Bernoullis, each an MLP with one
    hidden ReLU layer of ``hidden`` units; prior N(0, I); latent dimension ``latent``.
    Trained on the train split's images by Adam on the one-sample reparameterised negative
    ELBO (closed-form KL), batches of ``batch_size`` drawn without replacement epoch by epoch,
    for ``steps`` steps, learning rate ``lr`` decayed to 0 by a cosine over the steps.

    score(x) = L_k(b(x)) = log (1/k) sum_k p(b(x), z_k) / q(z_k | b(x)), z_k ~ q(z | b(x)),
    k = ``iwae_samples``: a lower bound on log p(b(x)) in nats, b the binarisation. Higher =
    more trustworthy. Every ``score`` call draws z from a fresh generator seeded from ``seed``,
    so scoring the same images twice gives identical scores; float64 scores.
    Needs: logits (for the contract), images. Fit: train split's images; val for metadata.
    Metadata: final_train_loss (mean negative ELBO of the last 100 steps), steps, bound,
    mean_train_score, mean_val_score.

    Defaults: hidden=512, latent=16 (TensorFlow Probability's example), steps=5000 and
    batch_size=32 (the paper's 5k steps at the example's batch size), lr=1e-3 (the example's),
    iwae_samples=16 (the paper), dtype="float64" (training precision; float32 rounding differs
    between CPUs, as for ``vae``), seed=0.
    Deviations: the paper's VAE has convolutional encoder and decoder (the TFP example's) and a
    learned MAF prior, which the paper found no better than the example's mixture prior; ours is
    fully connected with a N(0, I) prior. Static binarisation at 0.5 is our choice: the paper
    does not say how pixels were made binary.
    """

    name = "pixel-vae"
    needs = frozenset({"logits", "images"})

    def __init__(
        self,
        *,
        hidden: Annotated[int, Field(ge=1)] = 512,
        latent: Annotated[int, Field(ge=1)] = 16,
        steps: Annotated[int, Field(ge=1)] = 5000,
        batch_size: Annotated[int, Field(ge=1)] = 32,
        lr: Annotated[float, Field(gt=0)] = 1e-3,
        iwae_samples: Annotated[int, Field(ge=1)] = 16,
        dtype: str = "float64",
        seed: int = 0,
    ):
        if dtype not in TRAINING_DTYPES:
            raise PluginError(f"pixel-vae: dtype must be one of {sorted(TRAINING_DTYPES)}, got {dtype!r}")
        self.hidden, self.latent, self.steps, self.batch_size = hidden, latent, steps, batch_size
        self.lr, self.iwae_samples, self.dtype, self.seed = lr, iwae_samples, dtype, seed
        self._meta: dict[str, Any] = {}

    def fit(self, ctx: FitContext) -> None:
        self.device = ctx.device
        x = torch.from_numpy(binarise(ctx.train.images.x)).to(self.device, TRAINING_DTYPES[self.dtype])
        with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching global state
            torch.default_generator.manual_seed(self.seed)
            net = _BernoulliVAE(x.shape[1], self.hidden, self.latent).to(self.device, x.dtype)
        order = torch.Generator().manual_seed(self.seed)
        noise = torch.Generator(device=self.device).manual_seed(self.seed + 1)
        optimiser = torch.optim.Adam(net.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=self.steps)
        net.train()
        losses: list[float] = []
        batches = iter(())
        for step in range(self.steps):
            batch = next(batches, None)
            if batch is None:  # a new epoch: a fresh permutation of the training images
                batches = iter(torch.randperm(len(x), generator=order).split(self.batch_size))
                batch = next(batches)
            loss = -net.elbo(x[batch.to(self.device)], 1, noise).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise PluginError(f"pixel-vae: training loss became non-finite at step {step + 1}; try a smaller lr")
            if (step + 1) % 500 == 0:
                ctx.progress(f"pixel-vae step {step + 1}/{self.steps}: loss {np.mean(losses[-100:]):.3f}")
        self.net = net.double().eval()  # scores in float64 whatever the training precision
        self._meta = {"final_train_loss": float(np.mean(losses[-100:])), "steps": self.steps,
                      "bound": f"iwae_{self.iwae_samples}", "mean_train_score": float(self.score(ctx.train).mean()),
                      "mean_val_score": float(self.score(ctx.val).mean())}

    def state_dict(self) -> dict[str, Any]:
        return {**with_prefix(module_arrays(self.net), "net."), "dim": int(self.net.decoder[-1].out_features),
                "metadata": dict(self._meta)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.device = device_of(ctx)
        net = build_unseeded(lambda: _BernoulliVAE(int(state["dim"]), self.hidden, self.latent))
        self.net = load_module_arrays(net.double(), under_prefix(state, "net.")).to(self.device).eval()
        self._meta = dict(state["metadata"])

    @torch.no_grad()
    def score(self, view: SplitView) -> np.ndarray:
        x = torch.from_numpy(binarise(view.images.x)).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 2)
        bounds = [self.net.iwae(chunk, self.iwae_samples, generator)
                  for chunk in x.split(max(1, _SAMPLE_ROWS // self.iwae_samples))]
        scores = torch.cat(bounds).cpu().numpy() if bounds else np.empty(0)
        if not np.isfinite(scores).all():
            raise PluginError(f"pixel-vae: {int((~np.isfinite(scores)).sum())} of {len(scores)} scores of "
                              f"{view.name} are not finite (a diverged model)")
        return scores.astype(np.float64)

    def metadata(self) -> dict[str, Any]:
        return dict(self._meta)
