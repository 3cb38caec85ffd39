"""Post-hoc detectors read off penultimate features and the last layer (issue 21): RMDS, ViM, SHE, fDBD, NCI.

Each is fitted on the in-distribution training split only and computes in float64 from the
float32 features and logits the run shares. The helpers at the top are shared with ``knn.py``.
"""
from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import Field
from scipy.special import logsumexp

from oodbench.api import Detector, FitContext, PluginError, SplitView

#: Elements of the largest temporary array a chunked computation builds (2^22 float64 = 32 MiB).
CHUNK_ELEMENTS = 2**22


def float64(array: np.ndarray) -> np.ndarray:
    """A float64 copy (or view when already float64) of a read-only view array."""
    return np.asarray(array, dtype=np.float64)


def chunk_size(per_row: int) -> int:
    """Rows per chunk so that a chunk of ``per_row`` elements a row stays within ``CHUNK_ELEMENTS``."""
    return max(1, CHUNK_ELEMENTS // max(1, per_row))


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm, in float64; a zero row stays zero."""
    x = float64(features)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def require_train(ctx: FitContext, name: str) -> None:
    if not len(ctx.train):
        raise PluginError(f"{name}: the training split is empty")


def head_of(ctx: FitContext | None, name: str) -> Any:
    """The classifier, for its last layer: not learned, so taken from the context after a load too."""
    if ctx is None or ctx.model is None:
        raise PluginError(f"{name} needs the classifier's head (FitContext.model): pass the FitContext")
    return ctx.model


def affine_head(model: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the classifier's last layer, float64 (classes x D, classes); an error if it is not affine."""
    weight_bias = model.head_weight_bias()
    if weight_bias is None:
        raise PluginError(f"{name} needs an affine last layer for its W and b: this classifier's head "
                          "is not an nn.Linear")
    return weight_bias


def whitening(centered: np.ndarray, name: str, what: str) -> np.ndarray:
    """W (D x rank) with W W^T = Sigma^+ for Sigma = centered^T centered / N (the MLE covariance).

    Sigma^+ is scikit-learn's ``EmpiricalCovariance().precision_`` (``scipy.linalg.pinvh``): eigenvalues
    below D * eps * the largest are dropped, so dead feature directions do not blow up.
    """
    covariance = centered.T @ centered / len(centered)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    keep = eigenvalues > len(eigenvalues) * np.finfo(np.float64).eps * max(eigenvalues.max(), 0.0)
    if not keep.any():
        raise PluginError(f"{name}: the training features have zero {what} variance")
    return eigenvectors[:, keep] / np.sqrt(eigenvalues[keep])


def squared_distances(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """||points_i - centers_k||^2 (N x K) from differences, not the expanded form (which cancels); chunked."""
    out = np.empty((len(points), len(centers)))
    step = chunk_size(centers.size)
    for start in range(0, len(points), step):
        diff = points[start:start + step, None, :] - centers[None]
        out[start:start + step] = np.einsum("nkd,nkd->nk", diff, diff)
    return out


class RMDS(Detector):
    """Relative Mahalanobis distance (RMDS): class Mahalanobis minus a class-agnostic background Gaussian's.

    Ren, Fort, Liu, Roy, Padhy & Lakshminarayanan, "A simple fix to Mahalanobis distance for
    improving near-OOD detection" (arXiv 2106.09022, 2021). Fit on the training split's
    penultimate features z_i with labels y_i: class means mu_k and one shared covariance
    Sigma = (1/N) sum_i (z_i - mu_{y_i})(z_i - mu_{y_i})^T (Lee et al.'s), and a background
    Gaussian of all features, mu_0 = mean(z_i), Sigma_0 = (1/N) sum_i (z_i - mu_0)(z_i - mu_0)^T.
    With MD_k(z) = (z - mu_k)^T Sigma^+ (z - mu_k) and MD_0(z) = (z - mu_0)^T Sigma_0^+ (z - mu_0):

        score(x) = -min_k (MD_k(z) - MD_0(z)),   z = f(x).   Higher = more trustworthy.

    Pseudo-inverses as scikit-learn's ``EmpiricalCovariance.precision_`` (what the paper's and
    OpenOOD's code use): eigenvalues below D * eps * the largest are dropped. Distances are
    computed from whitened differences, in float64. Classes without training samples get no
    mean. Needs: features, labels (of the training split). No options.
    """

    name = "rmds"
    needs = frozenset({"features", "labels"})

    def __init__(self) -> None:
        self._state: dict[str, np.ndarray] | None = None

    def fit(self, ctx: FitContext) -> None:
        require_train(ctx, self.name)
        z, labels = float64(ctx.train.features), np.asarray(ctx.train.labels)
        classes = np.unique(labels)
        means = np.stack([z[labels == c].mean(0) for c in classes])
        whiten = whitening(z - means[np.searchsorted(classes, labels)], self.name, "within-class")
        mean0 = z.mean(0)
        whiten0 = whitening(z - mean0, self.name, "total")
        self._state = {"whiten": whiten, "centers": means @ whiten, "whiten0": whiten0, "center0": mean0 @ whiten0,
                       "classes": classes.astype(np.int64)}

    def _fitted(self) -> dict[str, np.ndarray]:
        if self._state is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        return self._state

    def state_dict(self) -> dict[str, Any]:
        return dict(self._fitted())

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._state = {key: np.asarray(state[key]) for key in ("whiten", "centers", "whiten0", "center0", "classes")}

    def relative_distances(self, features: np.ndarray) -> np.ndarray:
        """MD_k(z) - MD_0(z) for every row and class (N x K)."""
        s, z = self._fitted(), float64(features)
        class_md = squared_distances(z @ s["whiten"], s["centers"])
        background = squared_distances(z @ s["whiten0"], s["center0"][None])
        return class_md - background

    def score(self, view: SplitView) -> np.ndarray:
        return -self.relative_distances(view.features).min(1)

    def metadata(self) -> dict[str, Any]:
        s = self._fitted()
        return {"feature_dim": int(s["whiten"].shape[0]), "covariance_rank": int(s["whiten"].shape[1]),
                "background_rank": int(s["whiten0"].shape[1]), "classes": int(len(s["classes"]))}


def vim_dimension(feature_dim: int) -> int:
    """ViM's principal dimension D for N-dim features: the authors' 1000 (N >= 2048) or 512 (N >= 768, their ViT
    rule), else N // 2 (OpenOOD's CIFAR choice: 256 of ResNet-18's 512), so a residual space is always left."""
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return max(1, feature_dim // 2)


class ViM(Detector):
    """ViM, virtual-logit matching: energy minus the scaled norm of the feature's residual off the principal space.

    Wang, Li, Feng & Zhang, "ViM: Out-Of-Distribution with Virtual-logit Matching", CVPR 2022
    (the authors' ``benchmark.py``). With the last layer's W, b: origin u = -pinv(W) b; the
    eigenvectors of the uncentred covariance (1/N) sum_i (h_i - u)(h_i - u)^T of the training
    features h_i, sorted by eigenvalue; P^perp = those after the first D (the residual space);
    logits l(h) = W h + b recomputed in float64; alpha = sum_i max_c l_c(h_i) / sum_i ||P^perp^T (h_i - u)||
    over the training split (the authors' ratio of means). Score, higher = more trustworthy:

        score(x) = logsumexp_c l_c(h) - alpha ||P^perp^T (h - u)||,   h = f(x).

    Options: ``dim`` = D, the principal space's dimension (default: the authors' rule, see below).
    Choice of D: the authors' ``benchmark.py`` takes 1000 for features of >= 2048 dims and 512
    otherwise (their ViT's 768); for fewer than 768 dims 512 leaves little or no residual, so we take
    half the feature dimension, OpenOOD's choice for CIFAR ResNet-18 (256 of 512), as
    ``vim_dimension`` says. dim must be below the feature dimension. ``dim`` and ``alpha`` are in
    metadata().
    Deviations: eigenvectors from ``eigh`` of the symmetric covariance (the authors use ``eig``):
    the same subspace up to rounding.
    Needs: features, head (an affine last layer).
    """

    name = "vim"
    needs = frozenset({"features", "head"})

    def __init__(self, *, dim: Annotated[int, Field(ge=1)] | None = None):
        self.dim = dim
        self._state: dict[str, Any] | None = None
        self._weight: np.ndarray | None = None
        self._bias: np.ndarray | None = None

    def _logits(self, h: np.ndarray) -> np.ndarray:
        return h @ self._weight.T + self._bias

    def fit(self, ctx: FitContext) -> None:
        require_train(ctx, self.name)
        self._weight, self._bias = affine_head(head_of(ctx, self.name), self.name)
        h = float64(ctx.train.features)
        dim = vim_dimension(h.shape[1]) if self.dim is None else self.dim
        if dim >= h.shape[1]:
            raise PluginError(f"{self.name}: dim={dim} leaves no residual space for {h.shape[1]}-dim features")
        origin = -np.linalg.pinv(self._weight) @ self._bias
        centered = h - origin
        eigenvalues, eigenvectors = np.linalg.eigh(centered.T @ centered / len(h))
        residual = np.ascontiguousarray(eigenvectors[:, np.argsort(-eigenvalues, kind="stable")[dim:]])
        virtual = np.linalg.norm(centered @ residual, axis=1)
        if not virtual.mean() > 0:
            raise PluginError(f"{self.name}: the training features have no residual off the {dim}-dim principal space")
        alpha = float(self._logits(h).max(1).mean() / virtual.mean())
        self._state = {"origin": origin, "residual": residual, "alpha": alpha, "dim": dim}

    def _fitted(self) -> dict[str, Any]:
        if self._state is None or self._weight is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        return self._state

    def state_dict(self) -> dict[str, Any]:
        return dict(self._fitted())

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._weight, self._bias = affine_head(head_of(ctx, self.name), self.name)
        self._state = {"origin": np.asarray(state["origin"]), "residual": np.asarray(state["residual"]),
                       "alpha": float(state["alpha"]), "dim": int(state["dim"])}

    def virtual_logit(self, features: np.ndarray) -> np.ndarray:
        """alpha ||P^perp^T (h - u)|| per row."""
        s = self._fitted()
        return s["alpha"] * np.linalg.norm((float64(features) - s["origin"]) @ s["residual"], axis=1)

    def score(self, view: SplitView) -> np.ndarray:
        self._fitted()
        h = float64(view.features)
        return logsumexp(self._logits(h), axis=1) - self.virtual_logit(h)

    def metadata(self) -> dict[str, Any]:
        s = self._fitted()
        return {"dim": s["dim"], "alpha": s["alpha"], "feature_dim": int(s["residual"].shape[0])}


class SHE(Detector):
    """SHE, simplified Hopfield energy: the feature's inner product with its predicted class's stored pattern.

    Zhang, Fu, Li, Tao, Tan, Xu & Wang, "Out-of-distribution detection based on in-distribution
    data patterns memorization with modern Hopfield energy", ICLR 2023. Stored patterns: per
    class c, the mean penultimate feature s_c of the training inputs labelled c *and* predicted c
    (correctly classified). Score, higher = more trustworthy:

        score(x) = <h, s_{c(x)}>,   h = f(x),  c(x) = argmax_c logits_c(x)   (the classifier's prediction).

    The inner product is the paper's (and OpenOOD's default) metric. Needs: logits, features,
    labels (of the training split). No options. Deviation: a class none of whose training inputs
    is correctly classified falls back to the mean feature of all its training inputs (the paper
    leaves it undefined); which classes did is in metadata() as ``fallback_classes``. A class with
    no training inputs at all is an error.
    """

    name = "she"
    needs = frozenset({"logits", "features", "labels"})

    def __init__(self) -> None:
        self._patterns: np.ndarray | None = None
        self._fallback: list[int] = []

    def fit(self, ctx: FitContext) -> None:
        require_train(ctx, self.name)
        h, labels = float64(ctx.train.features), np.asarray(ctx.train.labels)
        predictions = ctx.train.predictions
        patterns, fallback = np.empty((ctx.num_classes, h.shape[1])), []
        for c in range(ctx.num_classes):
            rows = (labels == c) & (predictions == c)
            if not rows.any():
                rows = labels == c
                fallback.append(c)
                if not rows.any():
                    raise PluginError(f"{self.name}: class {c} has no training samples to store a pattern of")
            patterns[c] = h[rows].mean(0)
        self._patterns, self._fallback = patterns, fallback

    def _fitted(self) -> np.ndarray:
        if self._patterns is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        return self._patterns

    def state_dict(self) -> dict[str, Any]:
        return {"patterns": self._fitted(), "fallback_classes": list(self._fallback)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._patterns = np.asarray(state["patterns"])
        self._fallback = [int(c) for c in state["fallback_classes"]]

    def score(self, view: SplitView) -> np.ndarray:
        patterns = self._fitted()
        return np.einsum("nd,nd->n", float64(view.features), patterns[view.predictions])

    def metadata(self) -> dict[str, Any]:
        return {"classes": int(len(self._fitted())), "fallback_classes": list(self._fallback)}


class _TrainMeanAndHead(Detector):
    """fDBD and NCI: the training features' mean is all they learn; W (and b) come from the classifier."""

    needs = frozenset({"logits", "features", "head"})

    def __init__(self) -> None:
        self._train_mean: np.ndarray | None = None
        self._weight: np.ndarray | None = None
        self._bias: np.ndarray | None = None

    def _take_head(self, ctx: FitContext | None) -> None:
        self._weight, self._bias = affine_head(head_of(ctx, self.name), self.name)

    def fit(self, ctx: FitContext) -> None:
        require_train(ctx, self.name)
        self._take_head(ctx)
        self._train_mean = float64(ctx.train.features).mean(0)

    def _fitted(self) -> np.ndarray:
        if self._train_mean is None or self._weight is None:
            raise PluginError(f"{self.name}: call fit() before score()")
        return self._train_mean

    def state_dict(self) -> dict[str, Any]:
        return {"train_mean": self._fitted()}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._take_head(ctx)
        self._train_mean = np.asarray(state["train_mean"])

    def _distance_to_mean(self, h: np.ndarray) -> np.ndarray:
        # floored at the smallest normal float: a feature exactly at the mean scores huge, not inf
        return np.maximum(np.linalg.norm(h - self._fitted(), axis=1), np.finfo(np.float64).tiny)


class FDBD(_TrainMeanAndHead):
    """fDBD: the feature's mean distance to the decision boundaries of its prediction, over its distance to the mean.

    Liu & Qin, "Fast Decision Boundary based Out-of-Distribution Detector", ICML 2024 (the authors'
    ``run_cifar.py``). For an affine last layer (W, b) and prediction p = argmax_c logits_c(x), the
    distance of h = f(x) to the boundary between p and c is |(w_p - w_c)^T h + (b_p - b_c)| / ||w_p - w_c||;
    with mu the training features' mean, higher = more trustworthy:

        score(x) = (1 / (C - 1)) sum_{c != p} |(w_p - w_c)^T h + b_p - b_c| / ||w_p - w_c||  /  ||h - mu||.

    The logit differences are recomputed in float64 from h with W and b; p is the classifier's own
    prediction. Needs: logits, features, head (an affine last layer). No options. Deviations: the
    paper's average over the C - 1 other classes; the authors' code sums (a constant factor,
    the same ranking). Two classes with identical weight vectors have no boundary: an error.
    OpenOOD's variant that may divide by ||h|| instead, chosen on OOD validation data, is not used.
    """

    name = "fdbd"

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        self._check_boundaries()

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        super().load_state_dict(state, ctx)
        self._check_boundaries()

    def _check_boundaries(self) -> None:
        w = self._weight
        gaps = np.linalg.norm(w[:, None, :] - w[None], axis=2) + np.eye(len(w))
        if (gaps == 0).any():
            raise PluginError(f"{self.name}: two classes have the same weight vector, so no decision boundary")

    def boundary_distances(self, features: np.ndarray, predictions: np.ndarray) -> np.ndarray:
        """Mean over c != p of the distance of h to the (p, c) boundary, per row."""
        h, w, b = float64(features), self._weight, self._bias
        out = np.empty(len(h))
        classes = len(w)
        if classes < 2:
            raise PluginError(f"{self.name} needs at least two classes")
        step = chunk_size(classes * w.shape[1])
        for start in range(0, len(h), step):
            rows, p = h[start:start + step], predictions[start:start + step]
            diff_w = w[p][:, None, :] - w[None]                      # n x C x D: w_p - w_c
            margin = np.abs(np.einsum("ncd,nd->nc", diff_w, rows) + (b[p][:, None] - b[None]))
            norms = np.linalg.norm(diff_w, axis=2)
            norms[np.arange(len(p)), p] = 1.0                        # c = p contributes 0 / 1
            out[start:start + step] = (margin / norms).sum(1) / (classes - 1)
        return out

    def score(self, view: SplitView) -> np.ndarray:
        self._fitted()
        return self.boundary_distances(view.features, view.predictions) / self._distance_to_mean(float64(view.features))


class NCI(_TrainMeanAndHead):
    """NCI, neural-collapse inspired: the centred feature's alignment with its predicted class's weight, plus its L1 norm.

    Liu & Qin, "Detecting Out-of-distribution through the Lens of Neural Collapse", CVPR 2025 (the
    authors' code, OpenOOD's ``nci`` postprocessor, to which their repository points). With mu the
    training features' mean, w_p the last layer's weight row of the predicted class
    p = argmax_c logits_c(x), and h = f(x); higher = more trustworthy:

        score(x) = w_p^T (h - mu) / ||h - mu||  +  alpha ||h||_1.

    The first term is the proximity of the centred feature to w_p (the cosine similarity times
    ||w_p||, which neural collapse makes equal across classes; the authors do not divide by it);
    the second the L1-norm filter.
    Options: alpha=1e-4 weight of the L1 norm, the authors' default (their OpenOOD config).
    Choice of alpha: the authors sweep 1e-4 ... 0.1 on OOD validation data, which this benchmark
    never uses, so the default stays.
    Needs: logits, features, head (an affine last layer: only W is read).
    """

    name = "nci"

    def __init__(self, *, alpha: Annotated[float, Field(ge=0)] = 1e-4):
        super().__init__()
        self.alpha = alpha

    def score(self, view: SplitView) -> np.ndarray:
        self._fitted()
        h = float64(view.features)
        proximity = np.einsum("nd,nd->n", self._weight[view.predictions], h - self._train_mean)
        return proximity / self._distance_to_mean(h) + self.alpha * np.abs(h).sum(1)
