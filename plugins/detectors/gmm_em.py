"""Diagonal-covariance Gaussian mixtures fitted by EM in torch (CPU or CUDA), chunked over samples.

The algorithm is scikit-learn's ``GaussianMixture(covariance_type="diag")`` step for step, so
that, started from the same parameters, both give the same fit (to ~1e-14 in float64):

* initialisation: hard responsibilities from ``KMeans(n_clusters=K, n_init=1, random_state=seed)``
  labels (``init="kmeans"``) or from K distinct random samples (``init="random_from_data"``),
  followed by one M-step whose weights are ``n_k / N``; or explicit (weights, means, variances);
* M-step: ``n_k = sum_i r_ik + 10 eps``, ``mu_k = sum_i r_ik x_i / n_k``,
  ``var_k = sum_i r_ik x_i^2 / n_k - mu_k^2 + reg_covar``, ``pi_k = n_k / sum_j n_j``;
* stopping: the mean log-likelihood of the data under the parameters of each E-step (sklearn's
  ``lower_bound_``) changes by less than ``tol``, or ``max_iter`` iterations have run.

What differs is only how it is computed: the E-step of a chunk of rows is two matmuls,
``x @ (mu/var)^T`` and ``x^2 @ (1/var)^T``, plus per-component constants, then a logsumexp; the
M-step sums ``r^T 1``, ``r^T x`` and ``r^T x^2`` chunk by chunk, so no N x K matrix is held whole.
That expanded quadratic form cancels, so float32 matmuls are forced to full precision while EM or
scoring runs (TF32 gives NaN log-likelihoods at D=342, see MEASUREMENTS.md). The data are not
centred: post-ReLU features are exactly 0 in the units a cluster never uses, where the expanded
form is then exact; centring turns those zeros into large cancelling terms (measured on
post-ReLU-like data: a 250x larger float32 error in the mean log-likelihood).

Accuracy: float64 reproduces sklearn to ~1e-14 on small problems. In float32 the mean
log-likelihood stays within ~1e-4 relative of sklearn (measured up to N=50k, D=342, K=1000);
single samples agree to ~1e-4 on small, well-separated problems, but EM amplifies rounding when
many components share a cluster, so at K=1000 some samples move by nats between any two runs that
round differently (float32 with another chunk size, or float64 with another summation order,
on a smaller scale). ``random_from_data`` (every variance starts at ``reg_covar``) is the worst
case: there float32 runs, sklearn's included, differ at the percent level. Use float64 for
bit-for-bit comparisons.
One deviation from sklearn: a variance that float32 cancellation makes slightly negative is
clamped to 0 before ``reg_covar`` is added (sklearn would fail on it).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

#: scikit-learn's default; detectors on network features usually want more (see gmm.py).
DEFAULT_REG_COVAR = 1e-6
DEFAULT_CHUNK_SIZE = 8192
_LOG_2PI = math.log(2.0 * math.pi)


@contextmanager
def full_precision_matmuls() -> Iterator[None]:
    """Run float32 matmuls in true fp32 (no TF32, no bf16) inside the block; restore after.

    Restores what the process had, even on error. torch >= 2.9 keeps a legacy setting
    (``allow_tf32``, ``set_float32_matmul_precision``) and per-backend ``fp32_precision`` values
    side by side, and its legacy getters raise once the two disagree; so the switch goes through
    the legacy setters (which update both), the legacy values are restored when they were
    readable, and then the per-backend values are put back as they were.
    """
    matmul = torch.backends.cuda.matmul
    backends = [matmul, torch.backends.mkldnn.matmul] if hasattr(matmul, "fp32_precision") else []
    saved_backends = [b.fp32_precision for b in backends]
    try:
        saved_legacy: tuple[bool, str] | None = (matmul.allow_tf32, torch.get_float32_matmul_precision())
    except RuntimeError:  # the per-backend values were set directly: nothing legacy to restore
        saved_legacy = None
    torch.set_float32_matmul_precision("highest")
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        if saved_legacy is not None:
            torch.set_float32_matmul_precision(saved_legacy[1])
            matmul.allow_tf32 = saved_legacy[0]
        for backend, value in zip(backends, saved_backends):
            if backend.fp32_precision != value:
                backend.fp32_precision = value


@dataclass
class DiagonalGMM:
    """A fitted mixture: ``weights`` (K,), ``means`` and ``variances`` (K, D), on the fit's device.

    ``variances`` include ``reg_covar``. ``lower_bound`` is sklearn's ``lower_bound_``: the mean
    log-likelihood of the training data under the parameters of the last E-step (before the
    last M-step).
    """

    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor
    converged: bool
    n_iter: int
    lower_bound: float
    chunk_size: int = DEFAULT_CHUNK_SIZE

    @property
    def n_components(self) -> int:
        return len(self.weights)

    @property
    def n_features(self) -> int:
        return self.means.shape[1]

    def log_likelihood(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """log p(x) per row of ``x`` (N x D), computed in the mixture's dtype on its device."""
        x = (x if isinstance(x, torch.Tensor) else torch.tensor(x)).to(self.means.device, self.means.dtype)
        terms = _ComponentTerms(self.weights, self.means, self.variances)
        with full_precision_matmuls():
            parts = [
                torch.logsumexp(terms.weighted_log_prob(chunk, chunk * chunk), dim=1)
                for chunk in x.split(self.chunk_size)
            ]
        return torch.cat(parts) if parts else x.new_empty(0)

    def bits_per_dim(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """-log2 p(x) / D per row: the paper's BPD (negative values are fine for a density)."""
        return -self.log_likelihood(x) / (self.n_features * math.log(2.0))

    def to_state(self) -> dict[str, Any]:
        """The mixture as a detector state (``oodbench.api.Detector.state_dict``): its three tensors as arrays."""
        return {"weights": self.weights.cpu().numpy(), "means": self.means.cpu().numpy(),
                "variances": self.variances.cpu().numpy(), "converged": self.converged, "n_iter": self.n_iter,
                "lower_bound": self.lower_bound, "chunk_size": self.chunk_size}

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> "DiagonalGMM":
        """The mixture ``to_state`` described, on ``device``: same dtype and values, so the same log-likelihoods."""
        weights, means, variances = (torch.tensor(state[name], device=device)
                                     for name in ("weights", "means", "variances"))
        return cls(weights, means, variances, bool(state["converged"]), int(state["n_iter"]),
                   float(state["lower_bound"]), int(state["chunk_size"]))


class _ComponentTerms:
    """log pi_k + log N(x; mu_k, diag var_k) for a chunk, as constants plus two matmuls."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, variances: torch.Tensor):
        precisions = 1.0 / variances
        self.half_precisions_t = (0.5 * precisions).T.contiguous()
        self.scaled_means_t = (means * precisions).T.contiguous()
        d = means.shape[1]
        self.constant = (
            torch.log(weights)
            - 0.5 * (d * _LOG_2PI + (means * means * precisions).sum(1))
            - 0.5 * torch.log(variances).sum(1)
        )

    def weighted_log_prob(self, x: torch.Tensor, x_squared: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.constant, x, self.scaled_means_t)
        return out.addmm_(x_squared, self.half_precisions_t, alpha=-1.0)


def _m_step(
    count: torch.Tensor, sum_x: torch.Tensor, sum_x2: torch.Tensor, reg_covar: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n_k, means, variances) from responsibility-weighted sums, as sklearn computes them."""
    count = count + 10 * torch.finfo(count.dtype).eps
    means = sum_x / count[:, None]
    # Float32 cancellation can leave a zero variance slightly negative; reg_covar then keeps it positive.
    variances = (sum_x2 / count[:, None] - means * means).clamp_min_(0.0) + reg_covar
    return count, means, variances


def _initial_parameters(
    x: torch.Tensor, k: int, init: str, seed: int, reg_covar: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's init: hard responsibilities, one M-step, weights n_k / N (not renormalised)."""
    n = len(x)
    if init == "kmeans":
        from sklearn.cluster import KMeans  # here, not at registration: importing scikit-learn costs ~2 s

        labels = KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x.cpu().numpy()).labels_
        rows, components = torch.arange(n), torch.from_numpy(labels.astype(np.int64))
    elif init == "random_from_data":
        chosen = np.random.RandomState(seed).choice(n, size=k, replace=False)
        rows, components = torch.from_numpy(chosen.astype(np.int64)), torch.arange(k)
    else:
        raise ValueError(f"init must be 'kmeans', 'random_from_data' or (weights, means, variances), got {init!r}")
    rows, components = rows.to(x.device), components.to(x.device)
    count = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, components, torch.ones_like(rows, dtype=x.dtype))
    sum_x, sum_x2 = x.new_zeros(k, x.shape[1]), x.new_zeros(k, x.shape[1])
    for part, owner in zip(rows.split(DEFAULT_CHUNK_SIZE), components.split(DEFAULT_CHUNK_SIZE)):
        chosen = x[part]
        sum_x.index_add_(0, owner, chosen)
        sum_x2.index_add_(0, owner, chosen * chosen)
    count, means, variances = _m_step(count, sum_x, sum_x2, reg_covar)
    return count / n, means, variances


def fit_diagonal_gmm(
    x: torch.Tensor,
    k: int,
    *,
    reg_covar: float = DEFAULT_REG_COVAR,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: str | tuple[torch.Tensor, torch.Tensor, torch.Tensor] = "kmeans",
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    callback: Callable[[int, float], None] | None = None,
) -> DiagonalGMM:
    """Fit a K-component diagonal GMM to the rows of ``x`` by EM, on ``x``'s device and dtype.

    ``init``: ``"kmeans"`` (sklearn's default), ``"random_from_data"``, or explicit
    (weights (K,), means (K, D), variances (K, D)) like sklearn's ``weights_init``/``means_init``/
    ``1/precisions_init``. ``callback(iteration, lower_bound)`` is called after every iteration.
    ``tol=0`` runs exactly ``max_iter`` iterations.
    """
    if x.ndim != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a 2-D floating-point tensor, got {tuple(x.shape)} {x.dtype}")
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= number of samples, got k={k} for {n} samples")
    with full_precision_matmuls():
        if isinstance(init, str):
            weights, means, variances = _initial_parameters(x, k, init, seed, reg_covar)
        else:
            weights, means, variances = (torch.as_tensor(p).to(x.device, x.dtype) for p in init)

        lower_bound, converged, n_iter = -math.inf, False, 0
        while n_iter < max_iter and not converged:
            n_iter += 1
            terms = _ComponentTerms(weights, means, variances)
            count = x.new_zeros(k)
            sum_x, sum_x2 = x.new_zeros(k, x.shape[1]), x.new_zeros(k, x.shape[1])
            total = torch.zeros((), dtype=torch.float64, device=x.device)
            for chunk in x.split(chunk_size):
                # Squared per chunk, never for all of x: at ImageNet scale x alone is 10 GB.
                chunk2 = chunk * chunk
                # logsumexp by hand, so the exponentials it needs are the responsibilities too
                log_prob = terms.weighted_log_prob(chunk, chunk2)
                peak = log_prob.amax(1, keepdim=True)
                resp = log_prob.sub_(peak).exp_()
                norm = resp.sum(1, keepdim=True)
                total += (peak + norm.log()).sum(dtype=torch.float64)
                resp.div_(norm)
                count += resp.sum(0)
                sum_x.addmm_(resp.T, chunk)
                sum_x2.addmm_(resp.T, chunk2)
            count, means, variances = _m_step(count, sum_x, sum_x2, reg_covar)
            weights = count / count.sum()
            previous, lower_bound = lower_bound, total.item() / n
            if not math.isfinite(lower_bound):
                raise FloatingPointError(f"EM iteration {n_iter}: mean log-likelihood is {lower_bound}")
            converged = abs(lower_bound - previous) < tol
            if callback is not None:
                callback(n_iter, lower_bound)
    return DiagonalGMM(weights, means, variances, converged, n_iter, lower_bound, chunk_size)
