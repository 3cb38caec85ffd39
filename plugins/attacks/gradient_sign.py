"""Gradient-sign L-inf attacks: FGSM, BIM and PGD, all in [0, 1] pixel space."""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


class BIM(Attack):
    """Basic Iterative Method (Kurakin et al. 2017): ``steps`` FGSM steps of size alpha, projected.

    x_{t+1} = clip_{x, eps}(x_t + alpha sign(grad CE)), clipped to [0, 1], with
    alpha = ``step_ratio`` * eps / ``steps``. The default 2.5 follows Madry et al.'s choice for
    PGD so the ball's boundary is reached well before the last step (Kurakin et al. used
    alpha = 1/255 with min(eps*255 + 4, 1.25 eps*255) steps). Starts at x (no random start).
    """

    name = "bim"
    random_start = False

    def __init__(self, *, steps: int = 10, step_ratio: float = 2.5):
        self.steps, self.step_ratio = steps, step_ratio

    def perturb(self, model, images, labels, eps, generator):
        alpha = eps * self.step_ratio / self.steps
        adv = images.clone()
        if self.random_start:
            noise = torch.rand(images.shape, generator=generator) * 2 - 1
            adv = (images + eps * noise).clamp_(0.0, 1.0)
        for _ in range(self.steps):
            adv = adv + alpha * _gradient(model, adv, labels).sign()
            adv = torch.min(torch.max(adv, images - eps), images + eps).clamp_(0.0, 1.0)
        return adv


class PGD(BIM):
    """Projected Gradient Descent (Madry et al. 2018): BIM from a uniform random start in the eps-ball."""

    name = "pgd"
    random_start = True
