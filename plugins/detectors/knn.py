"""Nearest-neighbour detectors on penultimate features (issue 21): KNN (deep nearest neighbours) and NNGuide.

Both keep a bank of L2-normalised training features and search it exactly, in float64, in query
chunks whose similarity matrix stays within ``CHUNK_ELEMENTS`` (no faiss: exact search only).
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy.special import logsumexp

from oodbench.api import Detector, FitContext, PluginError, SplitView

from .feature_scores import chunk_size, float64, l2_normalise, require_train


def kth_nearest_distance(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each (unit-norm) query to its k-th nearest row of the (unit-norm) ``bank``.

    Neighbours are ranked by inner product (for unit vectors ||q - b||^2 = 2 - 2 q.b, so the same
    order), and the k-th one's distance is then computed from the difference, exactly.
    """
    out = np.empty(len(queries))
    step = chunk_size(len(bank))
    for start in range(0, len(queries), step):
        q = queries[start:start + step]
        similarity = q @ bank.T
        kth = np.argpartition(-similarity, k - 1, axis=1)[:, k - 1]
        out[start:start + step] = np.linalg.norm(q - bank[kth], axis=1)
    return out


def top_k_mean_inner_product(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k largest inner products of each query with the rows of ``bank``."""
    out = np.empty(len(queries))
    step = chunk_size(len(bank))
    for start in range(0, len(queries), step):
        similarity = queries[start:start + step] @ bank.T
        top = np.partition(similarity, len(bank) - k, axis=1)[:, len(bank) - k:]
        out[start:start + step] = np.sort(top, axis=1).mean(1)  # sorted: the sum's order does not depend on partition
    return out


class _FeatureBank(Detector):
    """A bank of training features searched for k neighbours; k is clamped to the bank's size."""

    k: int

    def __init__(self) -> None:
        self._bank: np.ndarray | None = None

    def _fitted(self) -> np.ndarray:
        if self._bank is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        return self._bank

    @property
    def k_used(self) -> int:
        return min(self.k, len(self._fitted()))

    def state_dict(self) -> dict[str, Any]:
        return {"bank": self._fitted()}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._bank = np.asarray(state["bank"])

    def metadata(self) -> dict[str, Any]:
        return {"k_used": self.k_used, "bank_size": int(len(self._fitted()))}


class KNN(_FeatureBank):
    """Deep nearest neighbours: minus the distance of the normalised feature to its k-th nearest normalised training feature.

    Sun, Ming, Zhu & Li, "Out-of-distribution detection with deep nearest neighbors", ICML 2022.
    With z = f(x) / ||f(x)||_2 and the bank z_1 ... z_N of the training split's normalised
    penultimate features, higher = more trustworthy:

        score(x) = -||z - z_(k)||_2,   z_(k) the k-th nearest bank feature to z.

    Options: k=50 neighbours (the paper's CIFAR-10 value), clamped to the training split's size.
    Choice of k: the paper uses 50 for CIFAR-10 (50,000 training images) and 1000 for ImageNet
    (1.28M), k/N about 1/1000. Our training splits are smaller (1,078 images on digits), so k/N
    is larger; k is kept at the paper's CIFAR-10 value rather than rescaled (``k_used`` in
    metadata() says what ran). The bank is every training input (the paper's 100% sampling).
    Deviations: exact search in float64, in chunks (the authors use faiss's exact IndexFlatL2,
    which returns squared distances: the same ranking); a zero feature stays zero rather than
    being divided by the authors' ||f|| + 1e-10.
    Needs: features.
    """

    name = "knn"
    needs = frozenset({"features"})

    def __init__(self, *, k: Annotated[int, Field(ge=1)] = 50):
        super().__init__()
        self.k = k

    def fit(self, ctx: FitContext) -> None:
        require_train(ctx, self.name)
        self._bank = l2_normalise(ctx.train.features)

    def score(self, view: SplitView) -> np.ndarray:
        return -kth_nearest_distance(self._fitted(), l2_normalise(view.features), self.k_used)


class NNGuide(_FeatureBank):
    """NNGuide: the energy score guided by the similarity to the k nearest confidence-scaled training features.

    Park, Jung & Teoh, "Nearest Neighbor Guidance for Out-of-Distribution Detection", ICCV 2023
    (the authors' ``ood_detectors/nnguide.py``). Bank: the training split's L2-normalised
    penultimate features, each scaled by its confidence, the negative energy
    E(x_i) = logsumexp_c logits_c(x_i):  b_i = E(x_i) f(x_i) / ||f(x_i)||. With z = f(x) / ||f(x)||,
    higher = more trustworthy:

        score(x) = E(x) * (1/k) sum of the k largest inner products <z, b_i>.

    Options: k=10 neighbours (the authors' config, ``knn_k``), clamped to the bank's size.
    Choices: computed in float64 from the classifier's logits, exact search; the bank is every
    training input (the authors sample 1% of ImageNet's training set for theirs; ours are small).
    Needs: logits, features.
    """

    name = "nnguide"
    needs = frozenset({"logits", "features"})

    def __init__(self, *, k: Annotated[int, Field(ge=1)] = 10):
        super().__init__()
        self.k = k

    def fit(self, ctx: FitContext) -> None:
        require_train(ctx, self.name)
        energy = logsumexp(float64(ctx.train.logits), axis=1)
        self._bank = l2_normalise(ctx.train.features) * energy[:, None]

    def score(self, view: SplitView) -> np.ndarray:
        guidance = top_k_mean_inner_product(self._fitted(), l2_normalise(view.features), self.k_used)
        return logsumexp(float64(view.logits), axis=1) * guidance
