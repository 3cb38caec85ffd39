"""Gradient-sign L-inf attacks: FGSM, BIM and PGD, all in [0, 1] pixel space."""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from oodbench.api import Attack, Classifier


def _gradient(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy input gradient at the true labels."""
    return model.input_gradient(x, lambda logits, _, labels: F.cross_entropy(logits, labels, reduction="none"),
                                targets=y)


class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al. 2015): x' = clip(x + eps sign(grad_x CE(f(x), y)), 0, 1).

    One forward+backward per image; ``y`` are the true labels.
    """

    name = "fgsm"

    def perturb(self, model, images, labels, eps, generator):
        return (images + eps * _gradient(model, images, labels).sign()).clamp_(0.0, 1.0)


def kurakin_steps(eps: float) -> int:
    """Kurakin et al.'s number of BIM iterations for ``eps`` in [0, 1] units: floor(min(E + 4, 1.25 E)) with
    E = 255 eps the radius in 0-255 pixel units (at least 1). 0.05 -> 15, 0.1 -> 29, 0.2 -> 55, 8/255 -> 10."""
    e = 255 * eps
    return max(1, math.floor(min(e + 4, 1.25 * e) + 1e-9))  # 1e-9: k/255 * 255 may land just under k


class BIM(Attack):
    """Basic Iterative Method (Kurakin et al. 2017): FGSM steps of size alpha, projected.

    x_0 = x, x_{t+1} = clip_{x, eps}(x_t + alpha sign(grad_x CE(f(x_t), y))), clipped to [0, 1]; ``y`` are the
    true labels. Starts at x (no random start). ``schedule`` sets alpha and the number of steps:

    * ``"fixed"`` (default): ``steps`` steps (default 10) of alpha = ``step_ratio`` * eps / ``steps``. The default
      ratio 2.5 (alpha = eps / 4) follows Madry et al.'s choice for PGD, so the ball's boundary is reached well
      before the last step.
    * ``"kurakin"``: the schedule of Kurakin, Goodfellow & Bengio, "Adversarial examples in the physical world"
      (ICLR 2017 workshop), section 2.2: alpha = 1 pixel value (1/255 here) and min(E + 4, 1.25 E) iterations,
      E = 255 eps the radius in 0-255 units, floored and at least 1 (:func:`kurakin_steps`: eps 0.05 -> 15 steps,
      0.1 -> 29, 0.2 -> 55). ``steps`` and ``step_ratio`` do not apply and must keep their defaults.
    """

    name = "bim"
    random_start = False

    def __init__(self, *, steps: Annotated[int, Field(ge=1)] = 10, step_ratio: Annotated[float, Field(gt=0)] = 2.5,
                 schedule: Literal["fixed", "kurakin"] = "fixed"):
        if schedule == "kurakin" and (steps, step_ratio) != (10, 2.5):
            raise ValueError(f"schedule 'kurakin' sets alpha = 1/255 and the steps from eps: steps={steps} and "
                             f"step_ratio={step_ratio} do not apply (leave them out, or use schedule 'fixed')")
        self.steps, self.step_ratio, self.schedule = steps, step_ratio, schedule

    def schedule_for(self, eps: float) -> tuple[int, float]:
        """(number of steps, step size alpha) at radius ``eps``."""
        if self.schedule == "kurakin":
            return kurakin_steps(eps), 1 / 255
        return self.steps, eps * self.step_ratio / self.steps

    def perturb(self, model, images, labels, eps, generator):
        steps, alpha = self.schedule_for(eps)
        adv = images.clone()
        if self.random_start:
            noise = torch.rand(images.shape, generator=generator) * 2 - 1
            adv = (images + eps * noise).clamp_(0.0, 1.0)
        for _ in range(steps):
            adv = adv + alpha * _gradient(model, adv, labels).sign()
            adv = torch.min(torch.max(adv, images - eps), images + eps).clamp_(0.0, 1.0)
        return adv


class PGD(BIM):
    """Projected Gradient Descent (Madry et al. 2018): BIM from a uniform random start in the eps-ball."""

    name = "pgd"
    random_start = True

    def __init__(self, *, steps: Annotated[int, Field(ge=1)] = 10, step_ratio: Annotated[float, Field(gt=0)] = 2.5):
        super().__init__(steps=steps, step_ratio=step_ratio)  # Madry et al.'s fixed schedule only
