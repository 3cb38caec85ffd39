"""Energy of logits recomputed through the classifier's head from changed penultimate activations or weights.

ReAct clips the activations, ASH prunes (and binarises or rescales) them per input, SCALE rescales
them per input, DICE sparsifies the head's weights; each then scores the energy
logsumexp(logits) of the result (T = 1, as every one of these papers does), in float64.
The shaped features go through ``ctx.model.head`` (any head, on the classifier's device and with
its numerics); DICE, which changes the weights themselves, needs an affine head
(``ctx.model.head_weight_bias()``). ASH and SCALE, like their papers, assume the non-negative
(post-ReLU, pooled) penultimate features every built-in network has.
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy.special import logsumexp

from oodbench.api import Detector, FitContext, PluginError, SplitView


def _energy(logits: np.ndarray) -> np.ndarray:
    return logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


def _model(detector: Detector, ctx: FitContext | None) -> Any:
    if ctx is None or ctx.model is None:
        raise PluginError(f"{detector.name} needs the classifier's head (ctx.model) to score")
    return ctx.model


def _kept(n: int, percentile: float) -> int:
    """How many of n activations survive pruning at ``percentile``: the authors' n - round(n p / 100)."""
    return n - int(np.round(n * percentile / 100.0))


def _top_k_mask(x: np.ndarray, k: int) -> np.ndarray:
    """Per row, True at the k largest entries (ties: the lower index first, a stable sort)."""
    mask = np.zeros(x.shape, dtype=bool)
    if k > 0 and x.size:
        order = np.argsort(-x, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, order, True, axis=1)
    return mask


def _ratio(total: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """s1 / s2 per input; 0 for an all-zero input (s1 = s2 = 0), whose shaped features are zero anyway."""
    out = np.zeros_like(total)
    np.divide(total, kept, out=out, where=kept != 0)
    return out


class _HeadDetector(Detector):
    """Keeps the classifier's handle for ``score`` and checks it is there."""

    needs = frozenset({"features", "head"})
    model: Any = None  # ctx.model, the classifier, kept for score

    def _head(self, features: np.ndarray) -> np.ndarray:
        if self.model is None:
            raise PluginError(f"{self.name}: score() called before fit()")
        return self.model.head(features)


class ReAct(_HeadDetector):
    """ReAct (Sun et al. 2021): energy of the logits of penultimate features clipped at a training percentile.

    Paper: Sun, Guo & Li, "ReAct: Out-of-distribution Detection With Rectified Activations",
    NeurIPS 2021: c = the p-th percentile of all penultimate activations (every unit of every
    input, flattened) of the in-distribution training split; h_bar = min(h(x), c);
    score = logsumexp(head(h_bar)), the negative energy (T = 1). Higher = more trustworthy.
    Needs: features, head. Fit: c (``np.percentile``, linear interpolation, as the authors' code).
    Options: percentile=90, the paper's default.

    At percentile 100 nothing of the training split is clipped and the score is the energy score.
    """

    name = "react"

    def __init__(self, *, percentile: Annotated[float, Field(gt=0, le=100)] = 90.0):
        self.percentile = percentile
        self.threshold: float | None = None

    def fit(self, ctx: FitContext) -> None:
        self.model = _model(self, ctx)
        if ctx.train.features.size == 0:
            raise PluginError(f"{self.name}: the training split is empty, so there is no percentile to clip at")
        self.threshold = float(np.percentile(ctx.train.features.astype(np.float64), self.percentile))

    def state_dict(self) -> dict[str, Any]:
        if self.threshold is None:
            raise PluginError(f"{self.name}: state_dict() called before fit()")
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.model, self.threshold = _model(self, ctx), float(state["threshold"])

    def score(self, view: SplitView) -> np.ndarray:
        if self.threshold is None:
            raise PluginError(f"{self.name}: score() called before fit()")
        return _energy(self._head(np.minimum(view.features.astype(np.float64), self.threshold)))

    def metadata(self) -> dict[str, Any]:
        return {"threshold": self.threshold}


class _ASH(_HeadDetector):
    """Shared by the three ASH variants: per-input pruning, nothing fitted."""

    def __init__(self, *, percentile: Annotated[float, Field(ge=0, lt=100)] = 90.0):
        self.percentile = percentile

    def fit(self, ctx: FitContext) -> None:
        self.model = _model(self, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.model = _model(self, ctx)

    def _shape(self, h: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def score(self, view: SplitView) -> np.ndarray:
        h = view.features.astype(np.float64)
        k = _kept(h.shape[1], self.percentile)
        shaped = self._shape(h, _top_k_mask(h, k), k)
        return _energy(self._head(shaped))


_ASH_DOC = """Paper: Djurisic, Bozanic, Ashok & Liu, "Extremely Simple Activation Shaping for
    Out-of-Distribution Detection", ICLR 2023, and the authors' ``ash.py``: per input, keep the
    k = D - round(D p / 100) largest of the D penultimate activations h and zero the rest, {what};
    score = logsumexp(head(shaped)), the energy score (T = 1). Higher = more trustworthy.
    Needs: features, head. Fit: nothing (the pruning threshold is per input).
    Options: percentile=90 (p), the paper's CIFAR setting (the authors' CIFAR configs run
    ash_s@90); its ImageNet experiments use other percentiles.
    Applied to the pooled penultimate vector, where the authors' usage example applies it (after
    the average pool). Ties at the k-th value keep the lower-numbered units."""


class ASHP(_ASH):
    __doc__ = ("""ASH-P (Djurisic et al. 2023): energy of the logits of per-input pruned penultimate activations.

    """ + _ASH_DOC.format(what="leaving the kept ones as they are") + """
    At percentile 0 nothing is pruned and the score is the energy score.
    """)

    name = "ash-p"

    def _shape(self, h: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        return np.where(mask, h, 0.0)


class ASHB(_ASH):
    __doc__ = ("""ASH-B (Djurisic et al. 2023): energy of the logits of per-input pruned and binarised activations.

    """ + _ASH_DOC.format(what="and set every kept one to s1 / k, with s1 = sum_j h_j the input's total "
                               "activation (so the total is preserved)") + """
    """)

    name = "ash-b"

    def _shape(self, h: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        fill = h.sum(1, keepdims=True) / max(k, 1)
        return np.where(mask, fill, 0.0)


class ASHS(_ASH):
    __doc__ = ("""ASH-S (Djurisic et al. 2023): energy of the logits of per-input pruned and exponentially rescaled activations.

    """ + _ASH_DOC.format(what="and multiply the kept ones by exp(s1 / s2), with s1 = sum_j h_j before "
                               "and s2 after pruning (an all-zero input stays zero)") + """
    At percentile 0 nothing is pruned but every input is scaled by e, so the score is not the
    plain energy score (the authors' formula, kept as is).
    """)

    name = "ash-s"

    def _shape(self, h: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
        pruned = np.where(mask, h, 0.0)
        scale = np.exp(_ratio(h.sum(1), pruned.sum(1)))
        return pruned * scale[:, None]


class Scale(_HeadDetector):
    """SCALE (Xu et al., ICLR 2024): energy of the logits of penultimate features scaled by exp(s1 / s2), unpruned.

    Paper: Xu, Chen, Franchi & Yao, "Scaling for Training Time and Post-hoc Out-of-distribution
    Detection Enhancement", ICLR 2024, and the authors' ``scale_net.py``: per input,
    s1 = sum_j h_j, s2 = the sum of its k = D - round(D p / 100) largest activations,
    r = s1 / s2; score = logsumexp(head(h * exp(r))), the energy (T = 1) of the logits of the
    *unpruned* features scaled by exp(r). Higher = more trustworthy.
    Needs: features, head. Fit: nothing (per input).
    Options: percentile=85 (p), the paper's ImageNet setting and the authors' config default.

    The scaling multiplies the features, as the authors' code does, so through an affine head it
    scales W h and not the bias b: head(h * e^r) = e^r W h + b. An all-zero input keeps r = 0.
    """

    name = "scale"

    def __init__(self, *, percentile: Annotated[float, Field(ge=0, lt=100)] = 85.0):
        self.percentile = percentile

    def fit(self, ctx: FitContext) -> None:
        self.model = _model(self, ctx)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.model = _model(self, ctx)

    def score(self, view: SplitView) -> np.ndarray:
        h = view.features.astype(np.float64)
        mask = _top_k_mask(h, _kept(h.shape[1], self.percentile))
        scale = np.exp(_ratio(h.sum(1), np.where(mask, h, 0.0).sum(1)))
        return _energy(self._head(h * scale[:, None]))


class DICE(_HeadDetector):
    """DICE (Sun & Li, ECCV 2022): energy of the logits of a head whose weights are sparsified by mean contribution.

    Paper: Sun & Li, "DICE: Leveraging Sparsification for Out-of-Distribution Detection", ECCV
    2022, and the authors' ``RouteDICE``: with m = the mean penultimate feature vector of the
    in-distribution training split, the contribution of weight W_cj is V_cj = W_cj m_j; the mask
    keeps the weights with V_cj > the p-th percentile of all C x D contributions (linear
    interpolation, strict >, as the authors' code); logits = h @ (W * mask).T + b;
    score = logsumexp(logits), the energy (T = 1), in float64. Higher = more trustworthy.
    Needs: features, head; the head must be affine (an ``nn.Linear``), else the fit fails with a
    PluginError. Fit: m and the mask.
    Options: sparsity=90 (p, the percentage of weights dropped), the paper's default.
    Deviation: at sparsity 0 every weight is kept (the authors' strict > would drop the single
    smallest contribution even then), so DICE at sparsity 0 is the energy score.
    """

    name = "dice"

    def __init__(self, *, sparsity: Annotated[float, Field(ge=0, lt=100)] = 90.0):
        self.sparsity = sparsity
        self.mean: np.ndarray | None = None
        self.mask: np.ndarray | None = None
        self.threshold: float | None = None
        self._weight: np.ndarray | None = None
        self._bias: np.ndarray | None = None

    def _take_head(self, ctx: FitContext | None) -> tuple[np.ndarray, np.ndarray]:
        self.model = _model(self, ctx)
        weight_bias = self.model.head_weight_bias()
        if weight_bias is None:
            raise PluginError(f"{self.name} sparsifies the weights of the classifier's last layer, so its head must be "
                              "an nn.Linear; this classifier's head is not affine")
        return weight_bias

    def fit(self, ctx: FitContext) -> None:
        weight, bias = self._take_head(ctx)
        if len(ctx.train.features) == 0:
            raise PluginError(f"{self.name}: the training split is empty, so there are no mean activations")
        self.mean = ctx.train.features.astype(np.float64).mean(0)
        contribution = weight * self.mean[None, :]
        self.threshold = float(np.percentile(contribution, self.sparsity))
        self.mask = contribution > self.threshold if self.sparsity > 0 else np.ones(weight.shape, dtype=bool)
        self._weight, self._bias = weight * self.mask, bias

    def state_dict(self) -> dict[str, Any]:
        if self.mask is None:
            raise PluginError(f"{self.name}: state_dict() called before fit()")
        return {"mean": self.mean, "mask": self.mask, "threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        weight, bias = self._take_head(ctx)
        self.mean = np.asarray(state["mean"], dtype=np.float64)
        self.mask = np.asarray(state["mask"], dtype=bool)
        self.threshold = float(state["threshold"])
        if self.mask.shape != weight.shape:
            raise PluginError(f"{self.name}: the stored mask has shape {self.mask.shape}, the head's weight "
                              f"{weight.shape}")
        self._weight, self._bias = weight * self.mask, bias

    def score(self, view: SplitView) -> np.ndarray:
        if self._weight is None:
            raise PluginError(f"{self.name}: score() called before fit()")
        return _energy(view.features.astype(np.float64) @ self._weight.T + self._bias)

    def metadata(self) -> dict[str, Any]:
        kept = None if self.mask is None else float(self.mask.mean())
        return {"threshold": self.threshold, "kept_fraction": kept}
