"""Mahalanobis confidence score on penultimate features (Lee, Lee, Lee & Shin, NeurIPS 2018)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodbench.api import Classifier, Detector, FitContext, PluginError, SplitView, fpr_at_tpr

from .odin import fgsm
from .stored import classifier_of

#: Lee et al.'s noise magnitudes, the list of their ``ADV_noise``/``m_list`` in OOD_Generate_Mahalanobis.py
#: (0.0, 0.01, 0.005, 0.002, 0.0014, 0.001, 0.0005), in ascending order. oodbench until 2026-12-02 searched
#: a wider grid that added 0.05, 0.1 and 0.2; ``mahalanobis-pre[epsilons=(...)]`` still takes any grid.
LEE_EPSILONS = (0.0, 0.0005, 0.001, 0.0014, 0.002, 0.005, 0.01)


def fit_tied_gaussian(features: np.ndarray, labels: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Class means and tied covariance as (W, mu W) with W W^T = Sigma^+ (see ``Mahalanobis``)."""
    feats = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    means = np.stack([feats[labels == c].mean(0) for c in classes])
    centered = feats - means[np.searchsorted(classes, labels)]
    covariance = centered.T @ centered / len(feats)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    # pinvh's default cutoff: what is below it is rounding noise, not variance.
    keep = eigenvalues > len(eigenvalues) * np.finfo(np.float64).eps * max(eigenvalues.max(), 0.0)
    if not keep.any():
        raise PluginError(f"{name}: the training features have zero within-class variance")
    whiten = eigenvectors[:, keep] / np.sqrt(eigenvalues[keep])
    return whiten, means @ whiten


def min_distance(whiten: np.ndarray, centers: np.ndarray, features: np.ndarray) -> np.ndarray:
    """min_c ||f W - mu_c W||^2 per row of ``features``, in float64."""
    whitened = np.asarray(features, dtype=np.float64) @ whiten
    out = np.empty(len(whitened))
    rows = max(1, 2**22 // centers.size)  # bounds the rows x classes x dims difference array
    for start in range(0, len(whitened), rows):
        diff = whitened[start:start + rows, None, :] - centers[None]
        out[start:start + rows] = np.einsum("nkd,nkd->nk", diff, diff).min(1)
    return out


def closest_distance_torch(features: torch.Tensor, whiten: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Differentiable min_c distance (float64); min's gradient is the closest class's."""
    diff = (features.double() @ whiten)[:, None, :] - centers[None]
    return (diff * diff).sum(-1).min(1).values


class Mahalanobis(Detector):
    """Mahalanobis score: minus the distance to the closest class mean under one tied covariance.

    Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution
    samples and adversarial attacks", NeurIPS 2018. Fit on the training split's penultimate
    features f_i with labels y_i: class means mu_c, and the tied covariance

        Sigma = (1/N) sum_c sum_{i: y_i = c} (f_i - mu_c)(f_i - mu_c)^T.

    Score, higher = more trustworthy:  M(x) = max_c -(f(x) - mu_c)^T Sigma^+ (f(x) - mu_c).

    Sigma^+ is the pseudo-inverse, as in the authors' code (scikit-learn's
    EmpiricalCovariance.precision_, i.e. ``scipy.linalg.pinvh``): eigenvalues below
    D * machine-eps * the largest are dropped, so collapsed feature directions (dead units)
    do not blow up. It is applied as a whitening map W with W W^T = Sigma^+, and the
    distance computed as ||f W - mu_c W||^2 from differences (not the expanded quadratic
    form, which cancels). Computed in float64. Classes without training samples get no mean.
    Needs: features, labels (of the training split). No options.

    This is the paper's single-layer (penultimate) score without input preprocessing;
    ``mahalanobis-pre`` adds the preprocessing, and ``mahalanobis-ensemble`` (and its
    ``-nood`` variant) the paper's full method: preprocessing and a logistic regression
    over the scores of several intermediate layers.
    """

    name = "mahalanobis"
    needs = frozenset({"logits", "features", "labels"})

    def __init__(self) -> None:
        self._whiten: np.ndarray | None = None
        self._centers: np.ndarray | None = None

    def fit(self, ctx: FitContext) -> None:
        if not len(ctx.train):
            raise PluginError(f"{self.name}: the training split is empty")
        self._whiten, self._centers = fit_tied_gaussian(ctx.train.features, ctx.train.labels, self.name)

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self._whiten is None or self._centers is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        return self._whiten, self._centers

    def state_dict(self) -> dict[str, Any]:
        whiten, centers = self._fitted()
        return {"whiten": whiten, "centers": centers}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._whiten, self._centers = state["whiten"], state["centers"]

    def min_distance(self, features: np.ndarray) -> np.ndarray:
        """min_c (f - mu_c)^T Sigma^+ (f - mu_c) for each row of ``features``."""
        return min_distance(*self._fitted(), features)

    def score(self, view: SplitView) -> np.ndarray:
        return -self.min_distance(view.features)

    def metadata(self) -> dict[str, Any]:
        whiten, centers = self._fitted()
        return {"feature_dim": int(whiten.shape[0]), "covariance_rank": int(whiten.shape[1]),
                "classes": int(len(centers))}


class MahalanobisPreprocessed(Mahalanobis):
    """Mahalanobis score after Lee et al.'s input preprocessing, eps chosen on clean vs FGSM val.

    Same paper and fit as ``mahalanobis``. The input is first moved to lower its distance to
    the closest class (chosen at x), then scored (higher = more trustworthy):

        x^ = x - eps * sign(grad_x (f(x) - mu_c*)^T Sigma^+ (f(x) - mu_c*)),
        c* = argmin_c of that distance at x,     score = M(x^).

    eps is in [0, 1] pixel space (the authors' code divides the step by the normalisation std,
    the same step in pixel space); x^ is not clipped, as in the authors' code; sign(0) = 0
    (their ``ge(grad, 0)`` steps exact zeros by -eps).

    Choosing eps: the authors' scripts pick it from ``LEE_EPSILONS`` = (0, 0.0005, 0.001,
    0.0014, 0.002, 0.005, 0.01) on held-out OOD samples, or, without OOD data, on FGSM
    samples. We never use failure-source data: ``fit`` picks the eps of ``epsilons``
    (default ``LEE_EPSILONS``) minimising the FPR at 95% TPR of clean validation images
    (positives) against FGSM versions of them (eps ``fgsm_epsilon`` = 0.05 in pixel space,
    true labels, clipped to [0, 1]; the authors' FGSM magnitude), ties to the smallest eps.
    A one-element ``epsilons`` fixes eps with no search. The paper tunes a logistic regression
    over layers on that data; with one layer, choosing eps by FPR is our simplification.
    Costs: fit, 3 forward+backward and 2 |epsilons| forwards per val image; score, one
    forward+backward and one forward per image (none when eps = 0).
    Needs: features, labels, gradients.
    """

    name = "mahalanobis-pre"
    needs = frozenset({"logits", "features", "labels", "gradients"})

    def __init__(self, *, epsilons: tuple[float, ...] = LEE_EPSILONS, fgsm_epsilon: float = 0.05):
        super().__init__()
        if not epsilons or min(epsilons) < 0:
            raise PluginError(f"{self.name}: epsilons must be a non-empty list of numbers >= 0, got {epsilons}")
        self.epsilons = tuple(sorted({float(e) for e in epsilons}))
        self.fgsm_epsilon = float(fgsm_epsilon)
        self.epsilon = self.epsilons[0]
        self.val_fpr95: dict[str, float] = {}
        self._model: Classifier | None = None

    def direction(self, model: Classifier, images: torch.Tensor) -> torch.Tensor:
        """sign(grad_x of the distance to the closest class): one forward+backward per image."""
        whiten, centers = (torch.from_numpy(a).to(model.device) for a in self._fitted())
        return model.input_gradient(images, lambda logits, features: closest_distance_torch(
            features, whiten, centers)).sign()

    def _scores(self, model: Classifier, images: torch.Tensor, direction: torch.Tensor, epsilon: float) -> np.ndarray:
        return -self.min_distance(model.outputs(images - epsilon * direction)[1].numpy())

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        if ctx.model is None:
            raise PluginError(f"{self.name} needs the classifier (FitContext.model) for input gradients")
        self._model = model = ctx.model
        if len(self.epsilons) == 1:
            self.epsilon = self.epsilons[0]
            return
        clean = ctx.val.images.tensor()
        images = torch.cat([clean, fgsm(model, clean, ctx.val.labels, self.fgsm_epsilon)])
        direction = self.direction(model, images)
        for epsilon in self.epsilons:
            scores = self._scores(model, images, direction, epsilon)
            self.val_fpr95[str(epsilon)] = fpr_at_tpr(scores[:len(clean)], scores[len(clean):], 0.95)
        self.epsilon = min(self.epsilons, key=lambda e: self.val_fpr95[str(e)])  # min keeps the first (smallest) of ties

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epsilon": self.epsilon, "val_fpr95": dict(self.val_fpr95)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        super().load_state_dict(state, ctx)
        self._model = classifier_of(ctx, self.name)
        self.epsilon, self.val_fpr95 = float(state["epsilon"]), dict(state["val_fpr95"])

    def score(self, view: SplitView) -> np.ndarray:
        if self.epsilon == 0.0:
            return super().score(view)
        if self._model is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        images = view.images.tensor()
        return self._scores(self._model, images, self.direction(self._model, images), self.epsilon)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "epsilon": self.epsilon, "val_fpr95_by_epsilon": dict(self.val_fpr95)}
