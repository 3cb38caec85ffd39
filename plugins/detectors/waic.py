"""Generative Ensembles: WAIC over independently trained density models (Choi, Jang & Alemi 2018)."""
from __future__ import annotations

import dataclasses
import importlib
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from oodbench.api import Detector, FitContext, PluginError, SplitView

from .stored import under_prefix, with_prefix

#: Member density models: name -> (module, relative to this package when it starts with ".",
#: class). Imported only when used, so a WAIC over Gaussian mixtures never loads the pixel
#: model's code, and vice versa.
MEMBERS: dict[str, tuple[str, str]] = {
    "gmm": (".gmm", "FeatureGMM"),
    "pixelcnn": (".pixelcnn", "PixelCNNPP"),
    "vae": (".vae", "FeatureVAE"),
    "maf": (".maf", "FeatureMAF"),
    "pixel-vae": (".pixel_vae", "PixelVAE"),
}


#: Options a member gets unless ``member_options`` says otherwise: the paper scores its VAE members
#: with a 16-sample IWAE bound (Burda et al. 2016), not the ELBO that ``vae`` uses on its own.
MEMBER_DEFAULTS: dict[str, dict[str, Any]] = {"vae": {"iwae_samples": 16}}


def member_seed(seed: int, m: int) -> int:
    """Seed of ensemble member m: seed * 1000 + m, distinct across members and across run seeds."""
    return seed * 1000 + m


def waic(log_liks: np.ndarray) -> np.ndarray:
    """WAIC per input from an (M, N) array of member log-likelihoods: mean_m - Var_m (ddof 0)."""
    return log_liks.mean(0) - log_liks.var(0)


class GenerativeEnsemble(Detector):
    """Generative Ensembles: WAIC(x) = mean_m log p_m(x) - Var_m log p_m(x) over M density models.

    Paper: Choi, Jang & Alemi, "WAIC, but Why? Generative Ensembles for Robust Anomaly Detection"
    (arXiv 1810.01392): M independently trained density models stand in for samples from the
    posterior over the model's parameters, and the input's score is the Watanabe-Akaike
    Information Criterion WAIC(x) = E_theta[log p_theta(x)] - Var_theta[log p_theta(x)].
    Higher = more trustworthy (likely under every member, and members agree).

    Score: with l_m = log p_m(x) (nats) of member m = 0..M-1,
    WAIC(x) = (1/M) sum_m l_m - (1/M) sum_m (l_m - mean l)^2. The variance is the population
    one (divisor M): the paper writes Var_theta, a moment of the posterior, without naming an
    estimator; Watanabe's functional variance is E_w[l^2] - E_w[l]^2 over posterior draws,
    i.e. divisor M (Gelman et al.'s p_WAIC2 uses M - 1: a factor M/(M-1) on the penalty).

    Members (option ``member``): "gmm" (default: class-agnostic diagonal GMM on penultimate
    features, cheap; not in the paper), "pixelcnn" (PixelCNN++ on pixels, the paper's setting
    of a likelihood model on the raw input; the paper used a VAE/IWAE for MNIST and Glow for
    CIFAR-10), "pixel-vae" (a VAE on binarised pixels scored by the 16-sample IWAE bound: the
    paper's MNIST members), "vae" (VAE on features scored by the 16-sample IWAE bound, as the
    paper scores its VAEs; ``member_options={"iwae_samples": k}`` for another k, 0 for the
    ELBO), "maf" (MAF on features). Member m is built with
    seed = seed * 1000 + m (its FitContext carries that seed too), so members differ only by
    their random initialisation and data order, as in the paper ("retraining the same
    architecture with a different random seed"); every member sees the same full training set.
    ``member_options`` (dict) are passed to every member's constructor, e.g. {"k": 10} for
    gmm or {"config": "paper"} for pixelcnn.
    Needs: logits, features, images (the union of what members may read; a member reads only
    its own). Defaults: member="gmm", M=5, member_options={} (each member's own defaults), seed=0.
    Deviations: the member model family is a choice (gmm by default) rather than the paper's
    VAE/Glow. The paper benchmark files ask for the paper's setting (``[detectors.waic]``):
    PixelCNN++ members on pixels in place of Glow for CIFAR, pixel-space VAE members with the
    IWAE bound for MNIST (``pixel-vae``, whose own deviations its docstring lists).
    """

    name = "waic"
    needs = frozenset({"logits", "features", "images"})

    def __init__(self, *, member: str = "gmm", M: Annotated[int, Field(ge=2)] = 5,
                 member_options: dict[str, Any] | None = None, seed: int = 0):
        if member not in MEMBERS:
            raise PluginError(f"waic: member must be one of {sorted(MEMBERS)}, got {member!r}")
        if M < 2:
            raise PluginError(f"waic: M must be at least 2 (the variance of one model is 0), got {M}")
        self.member, self.M, self.seed = member, M, seed
        self.member_options = {**MEMBER_DEFAULTS.get(member, {}), **(member_options or {})}
        if "seed" in self.member_options:
            raise PluginError("waic: member seeds are seed * 1000 + m; set the ensemble's seed, not member_options['seed']")
        self.seeds = [member_seed(seed, m) for m in range(M)]
        self.members: list[Detector] = []

    def _member_class(self) -> type[Detector]:
        module, cls_name = MEMBERS[self.member]
        cls = getattr(importlib.import_module(module, __package__), cls_name)
        missing = set(cls.needs) - self.needs
        if missing:
            raise PluginError(f"waic: member {self.member!r} needs {sorted(missing)}, which waic does not declare")
        return cls

    def fit(self, ctx: FitContext) -> None:
        cls = self._member_class()
        self.members = []
        for m, seed in enumerate(self.seeds):
            ctx.progress(f"waic: fitting member {m + 1}/{self.M} ({self.member}, seed {seed})")
            member = cls(**self.member_options, seed=seed)
            member.fit(dataclasses.replace(ctx, seed=seed))
            self.members.append(member)

    def state_dict(self) -> dict[str, Any]:
        # Every member's own state under "member<m>.": a member without one (none built in) cannot be stored.
        if not self.members:
            raise PluginError("waic: state_dict called before fit")
        state: dict[str, Any] = {"members": len(self.members)}
        for m, member in enumerate(self.members):
            state.update(with_prefix(member.state_dict(), f"member{m}."))
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        if int(state["members"]) != self.M:
            raise PluginError(f"waic: the stored state has {state['members']} members, not M={self.M}")
        cls = self._member_class()
        self.members = []
        for m, seed in enumerate(self.seeds):
            member = cls(**self.member_options, seed=seed)
            member.load_state_dict(under_prefix(state, f"member{m}."),
                                   None if ctx is None else dataclasses.replace(ctx, seed=seed))
            self.members.append(member)

    def member_log_likelihoods(self, view: SplitView) -> np.ndarray:
        """(M, N) float64 array: log p_m(x) of every input under every member."""
        if not self.members:
            raise PluginError("waic: score called before fit")
        return np.stack([np.asarray(member.score(view), dtype=np.float64) for member in self.members])

    def score(self, view: SplitView) -> np.ndarray:
        return waic(self.member_log_likelihoods(view))

    def metadata(self) -> dict[str, Any]:
        return {
            "member": self.member,
            "member_seeds": self.seeds,
            "variance": "population (divisor M)",
            "members": [member.metadata() for member in self.members],
        }
