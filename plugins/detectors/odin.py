"""ODIN: temperature scaling plus input preprocessing (Liang, Li & Srikant, ICLR 2018).

Also home of two helpers other gradient detectors reuse: FGSM validation negatives and the
shared-gradient grid search.
"""
from __future__ import annotations

from typing import Annotated, Any, Sequence

import numpy as np
import torch
from pydantic import Field
from scipy.special import log_softmax

from oodbench.api import Classifier, Detector, FitContext, Holdout, PluginError, SplitView, fpr_at_tpr

from .stored import classifier_of

#: The paper's grid (Section 4, "Choosing parameters").
PAPER_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
PAPER_EPSILONS = tuple(float(e) for e in np.linspace(0.0, 0.004, 21))


def max_softmax(logits: torch.Tensor | np.ndarray, temperature: float) -> np.ndarray:
    """max_c softmax(logits / T)_c in float64, as exp(max log_softmax): float32 softmax saturates."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    return np.exp(log_softmax(z, axis=1).max(1))


def odin_direction(model: Classifier, images: torch.Tensor, temperature: float) -> torch.Tensor:
    """sign(grad_x log S_yhat(x; T)), yhat = argmax f(x): x~ = x + eps * this = x - eps * sign(-grad).

    One forward+backward per image.
    """

    def log_score(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits / temperature, dim=1)
        return log_probs.gather(1, logits.argmax(1, keepdim=True)).squeeze(1)

    return model.input_gradient(images, log_score).sign()


def odin_scores(model: Classifier, images: torch.Tensor, temperature: float, epsilon: float) -> np.ndarray:
    """S(x~; T) for a batch: one forward+backward at x, one forward at x~."""
    perturbed = images + epsilon * odin_direction(model, images, temperature)
    return max_softmax(model.logits(perturbed), temperature)


def fgsm(model: Classifier, images: torch.Tensor, labels: np.ndarray, epsilon: float) -> torch.Tensor:
    """FGSM (Goodfellow et al. 2015) in pixel space: clip(x + eps * sign(grad_x CE(f(x), y)), 0, 1)."""
    targets = torch.tensor(labels, dtype=torch.long)  # a copy: views are read-only
    grad = model.input_gradient(
        images, lambda logits, features, y: torch.nn.functional.cross_entropy(logits, y, reduction="none"),
        targets=targets)
    return (images + epsilon * grad.sign()).clamp_(0.0, 1.0)


def grid_search(
    model: Classifier,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperatures: Sequence[float],
    epsilons: Sequence[float],
) -> tuple[float, float, float, int]:
    """(T, eps, FPR at 95% TPR, directions) minimising that FPR of S(x~; T), positives vs negatives.

    The gradient sign depends on T but not on eps, so each T costs one forward+backward per
    image. f(x + eps d) depends only on the image, eps and d, and at large T most images keep
    the direction they had at a smaller T (on digits 277 of 288 at T = 1000 and 500): an image
    whose direction was seen before reuses those logits, and the eps = 0 logits (d plays no
    part) are computed once. So the forwards are |distinct (image, direction) pairs| per eps > 0,
    plus one per image for eps = 0; ``directions`` is that number of pairs. The scores are
    exactly those of the plain grid. Ties go to the smallest T, then eps.
    """
    if not len(positives) or not len(negatives):
        raise PluginError("ODIN tuning needs at least one positive and one negative image")
    images = torch.cat([positives, negatives])
    n_pos = len(positives)
    moving = sorted({float(e) for e in epsilons if e > 0})
    still = model.logits(images) if 0.0 in set(epsilons) else None
    seen: list[tuple[torch.Tensor, dict[float, torch.Tensor]]] = []  # per earlier T: (direction, logits per eps)
    classes, directions = None, 0
    best: tuple[float, float, float] | None = None
    for temperature in sorted(set(temperatures)):
        direction = odin_direction(model, images, temperature).to(torch.int8)  # -1, 0, 1
        source = torch.full((len(images),), -1)  # which earlier T had the same direction, image by image
        for index, (earlier, _) in enumerate(seen):
            source[(source < 0) & (direction == earlier).flatten(1).all(1)] = index
        rows = torch.nonzero(source < 0).squeeze(1)
        directions += len(rows)
        logits = {}
        for epsilon in moving:
            fresh = model.logits(images[rows] + epsilon * direction[rows].to(images.dtype)) if len(rows) else None
            classes = classes or fresh.shape[1]  # every image is new at the first T
            logits[epsilon] = torch.empty(len(images), classes)
            if fresh is not None:
                logits[epsilon][rows] = fresh
            for index, (_, earlier_logits) in enumerate(seen):
                logits[epsilon][source == index] = earlier_logits[epsilon][source == index]
        seen.append((direction, logits))
        for epsilon in sorted({float(e) for e in epsilons}):
            scores = max_softmax(still if epsilon == 0.0 else logits[epsilon], temperature)
            fpr = fpr_at_tpr(scores[:n_pos], scores[n_pos:], 0.95)
            if best is None or fpr < best[2]:
                best = (float(temperature), float(epsilon), fpr)
    assert best is not None
    return (*best, directions)


def _check_grid(temperatures: Sequence[float], epsilons: Sequence[float]) -> None:
    if not temperatures or min(temperatures) <= 0:
        raise PluginError(f"ODIN temperatures must be a non-empty list of positive numbers, got {temperatures}")
    if not epsilons or min(epsilons) < 0:
        raise PluginError(f"ODIN epsilons must be a non-empty list of numbers >= 0, got {epsilons}")


class Odin(Detector):
    """ODIN: max softmax at temperature T of an input nudged to raise it; (T, eps) tuned per source.

    Liang, Li & Srikant, "Enhancing the reliability of out-of-distribution image detection in
    neural networks", ICLR 2018. Score, higher = more trustworthy:

        S(x~; T) = max_i softmax(f(x~) / T)_i,   x~ = x - eps * sign(-grad_x log S_yhat(x; T)),

    yhat = argmax_i f_i(x). Computed in float64 as exp(max log_softmax). ``tune(holdout)``
    picks (T, eps) on the grid ``temperatures`` x ``epsilons`` (default: the paper's
    T in {1, 2, 5, ..., 1000} x 21 eps evenly spaced in [0, 0.004]) minimising the FPR at 95%
    TPR of the holdout's positives against its negatives, ties to the smallest T then eps;
    one forward+backward per T and one forward per (T, eps) on every holdout image. Without
    ``tune`` it scores with ``temperature`` = 1000 and ``epsilon`` = 0.0014, the paper's
    DenseNet/CIFAR-10 setting. Needs: logits, gradients (the classifier, for input gradients).

    Choices and deviations, stated explicitly:

    * eps is in [0, 1] pixel space. The authors' code steps in normalised space by
      eps / std per channel, which is the same step in pixel space; our networks normalise
      internally.
    * x~ is not clipped to [0, 1]: neither the paper nor the authors' code clips it.
    * sign() follows the paper: a zero gradient component gives no step. The authors' code
      uses ``ge(grad, 0)``, which steps those pixels by -eps (only exact zeros differ).
    * The paper tunes on 1,000 held-out images per OOD set; here the holdout is whatever the
      core holds out of each failure source (its positives and negatives).
    * With eps = 0, x~ = x and the score is read off the cached logits (no network pass).

    Cost: the paper grid is 10 forward+backward per holdout image and at most 201 forwards
    (one at eps = 0, then 20 per temperature whose gradient sign differs from every smaller
    temperature's; see ``grid_search``): 117 on average on digits, ~0.6 s per source there.
    The choice per source, with ``grid_directions`` (the (image, direction) pairs that needed
    forwards), is returned by ``tune`` (the core records it in each row), so ``metadata``
    adds nothing.
    """

    name = "odin"
    needs = frozenset({"logits", "gradients"})
    tunes_on_source = True

    def __init__(
        self,
        *,
        temperature: Annotated[float, Field(gt=0)] = 1000.0,
        epsilon: float = 0.0014,
        temperatures: tuple[float, ...] = PAPER_TEMPERATURES,
        epsilons: tuple[float, ...] = PAPER_EPSILONS,
    ):
        _check_grid(temperatures, epsilons)
        _check_grid((temperature,), (epsilon,))
        self.temperatures = tuple(float(t) for t in temperatures)
        self.epsilons = tuple(float(e) for e in epsilons)
        self.choice: dict[str, float] = {"temperature": float(temperature), "epsilon": float(epsilon)}
        self._model: Classifier | None = None

    def fit(self, ctx: FitContext) -> None:
        if ctx.model is None:
            raise PluginError(f"{self.name} needs the classifier (FitContext.model) for input gradients")
        self._model = ctx.model

    def _handle(self) -> Classifier:
        if self._model is None:
            raise PluginError(f"{self.name}: call fit() before tune() or score()")
        return self._model

    def state_dict(self) -> dict[str, Any]:
        # The (T, eps) in use: the options' until tune() picks per source, what fit chose for odin-nood.
        return {"choice": dict(self.choice)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._model = classifier_of(ctx, self.name)
        self.choice = dict(state["choice"])

    def tune(self, holdout: Holdout) -> dict[str, Any]:
        temperature, epsilon, fpr, directions = grid_search(
            self._handle(),
            holdout.positives.images.tensor(),
            holdout.negatives.images.tensor(),
            self.temperatures,
            self.epsilons,
        )
        self.choice = {"temperature": temperature, "epsilon": epsilon, "holdout_fpr95": fpr,
                       "grid_directions": directions}
        return dict(self.choice)

    def score(self, view: SplitView) -> np.ndarray:
        temperature, epsilon = self.choice["temperature"], self.choice["epsilon"]
        if epsilon == 0.0:
            return max_softmax(view.logits, temperature)
        return odin_scores(self._handle(), view.images.tensor(), temperature, epsilon)


class OdinNoOOD(Odin):
    """ODIN with (T, eps) chosen on in-distribution data only: clean val vs FGSM val images.

    Same score as ``odin`` (see there). ``fit`` picks (T, eps) on the same grid, minimising
    the FPR at 95% TPR of the clean validation images (positives) against FGSM versions of
    them (negatives: eps = ``fgsm_epsilon`` = 0.05 in pixel space, true labels, clipped to
    [0, 1]). That validation set is our choice, in the spirit of Lee et al. (NeurIPS 2018),
    who validate on FGSM samples (eps 0.05) when no OOD data may be used; ODIN's paper
    itself always tunes on the OOD set. Never sees failure-source data. Needs: logits,
    labels (for FGSM), gradients. Fit cost per val image: 1 + 2 |T| forward+backward and at
    most 2 (1 + |T| |eps > 0|) forwards (21 and 402 with the paper grid; fewer where
    directions repeat across T, as in ``grid_search``).
    """

    name = "odin-nood"
    needs = frozenset({"logits", "labels", "gradients"})
    tunes_on_source = False

    def __init__(
        self,
        *,
        temperatures: tuple[float, ...] = PAPER_TEMPERATURES,
        epsilons: tuple[float, ...] = PAPER_EPSILONS,
        fgsm_epsilon: float = 0.05,
    ):
        super().__init__(temperatures=temperatures, epsilons=epsilons)
        self.fgsm_epsilon = float(fgsm_epsilon)

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        model = self._handle()
        clean = ctx.val.images.tensor()
        adversarial = fgsm(model, clean, ctx.val.labels, self.fgsm_epsilon)
        temperature, epsilon, fpr, directions = grid_search(model, clean, adversarial, self.temperatures, self.epsilons)
        self.choice = {"temperature": temperature, "epsilon": epsilon, "val_fpr95": fpr, "grid_directions": directions}

    def metadata(self) -> dict[str, Any]:
        return dict(self.choice)
