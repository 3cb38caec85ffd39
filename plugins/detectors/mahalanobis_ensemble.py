"""Lee et al.'s full Mahalanobis detector: per-layer scores with input preprocessing, combined by logistic regression."""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from oodbench.api import Classifier, Detector, FitContext, Holdout, PluginError, SplitView, fpr_at_tpr

from .mahalanobis import LEE_EPSILONS, closest_distance_torch, fit_tied_gaussian, min_distance
from .odin import fgsm
from .stored import classifier_of, under_prefix, with_prefix

#: The noise magnitudes of the authors' scripts (pixel space), the same grid as ``mahalanobis-pre``'s.
ENSEMBLE_EPSILONS = LEE_EPSILONS
#: Fewest held-out inputs per side to tune on: each half must feed a 5-fold cross-validation.
MIN_HOLDOUT_PER_SIDE = 10
#: The authors' FGSM magnitude for validation without OOD data (pixel space).
FGSM_EPSILON = 0.05


@dataclass
class _Inputs:
    """Images to score, with their cached layer means when there are any (eps = 0 needs no pass then)."""

    images: torch.Tensor
    layers: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def of(cls, view: SplitView) -> "_Inputs":
        return cls(view.images.tensor(), view.layers)


def _accuracy(estimator, x: np.ndarray, y: np.ndarray) -> float:
    """Mean of (predict(x) == y): scikit-learn's "accuracy" scorer without its per-call overhead.

    The same value to the bit; the named scorer's validation was half of the whole detector's
    time on digits (50 scorings per fit, 7 fits per failure source).
    """
    return float(np.mean(estimator.predict(x) == y))


def _fit_regression(x: np.ndarray, y: np.ndarray):
    """Standardise, then scikit-learn's LogisticRegressionCV as the authors' script (its defaults: 10 Cs, 5 folds, L2).

    ``scoring`` is pinned to accuracy, that script's default, which scikit-learn 1.11 changes.
    """
    # scikit-learn here, not at registration, where it would cost every command ~2 s
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = make_pipeline(StandardScaler(), LogisticRegressionCV(scoring=_accuracy, max_iter=1000))
    # A few-feature fit is ~10x slower with multi-threaded BLAS on a busy machine; separable
    # holdouts (common: noise is easy) leave the weakest-regularised C unconverged, which the
    # cross-validation then simply does not pick, and sklearn 1.8 announces an attribute
    # change that does not concern us: neither warning is the user's to act on.
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return regression.fit(x, y)


@dataclass(frozen=True)
class _Regression:
    """A fitted ``_fit_regression`` pipeline as its four arrays: what the detector keeps, scores with and stores.

    ``decision_function`` repeats the pipeline's arithmetic step for step (StandardScaler's
    ``(x - mean) / scale``, then ``@ coef.T + intercept``), so its values are scikit-learn's
    to the bit, while the stored state holds arrays rather than a pickled estimator.
    """

    mean: np.ndarray  # (L,)
    scale: np.ndarray  # (L,)
    coef: np.ndarray  # (1, L)
    intercept: np.ndarray  # (1,)

    @classmethod
    def of(cls, pipeline) -> "_Regression":
        scaler, logistic = pipeline[0], pipeline[-1]
        return cls(scaler.mean_, scaler.scale_, logistic.coef_, logistic.intercept_)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        standardised = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        return (standardised @ self.coef.T + self.intercept).reshape(-1)

    def layer_weights(self) -> list[float]:
        """alpha_l of score = b + sum_l alpha_l M_l: the coefficients in unstandardised units."""
        return (self.coef[0] / self.scale).tolist()

    def to_state(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> "_Regression":
        return cls(state["mean"], state["scale"], state["coef"], state["intercept"])


class MahalanobisEnsemble(Detector):
    """Mahalanobis feature ensemble (Lee et al. 2018): per-layer scores, logistic regression, tuned on held-out OOD.

    Lee, Lee, Lee & Shin, "A simple unified framework for detecting out-of-distribution
    samples and adversarial attacks", NeurIPS 2018, Algorithm 1 with the feature ensemble.
    For every intermediate layer l the classifier exposes (``forward_layers``; each output
    reduced to its per-channel spatial mean, as in the authors' code), fit class means and a
    tied covariance on the training split exactly as ``mahalanobis`` does. Per layer:

        x^_l = x - eps * sign(grad_x d_l(x)),  d_l(x) = min_c (f_l(x) - mu_lc)^T Sigma_l^+ (f_l(x) - mu_lc),
        M_l(x) = -d_l(x^_l),

    and the score, higher = more trustworthy, is the logistic regression's decision value

        score(x) = b + sum_l alpha_l M_l(x).

    Tuning (``tune``), as the authors' regression script does on 1,000 held-out samples per
    side: the holdout's first half of positives and negatives trains a ``LogisticRegressionCV``
    (scikit-learn, default Cs/5-fold CV) per eps of ``epsilons`` (default the script's seven,
    0 ... 0.01, pixel space); the eps whose regression has the lowest FPR at 95% TPR on the
    holdout's second half wins (ties: the smallest eps), with that regression's weights.
    The holdout is excluded from evaluation and the CSV marks the rows as tuned on the source.
    A holdout with fewer than 10 inputs on a side (e.g. the ``mistakes`` of an accurate
    classifier) cannot train a cross-validated regression; the rows then use the choice of
    ``mahalanobis-ensemble-nood`` (clean vs FGSM validation images, option ``fgsm_epsilon``) and ``tuned_params`` says
    so (``"tuned_on"``), the holdout still excluded from evaluation.

    Deviations: the per-layer scores are standardised before the regression (a
    ``StandardScaler``: same model class, it only helps L-BFGS converge on distances of
    very different scales); the step is not clipped to [0, 1], as in the authors' code.
    Costs: eps = 0 reads cached layer outputs (no passes); otherwise per image and layer one
    forward+backward and one forward (per eps while tuning), once per distinct image: images
    that several sources share (the test positives) are perturbed once per eps, then memoised.
    Needs: layers, labels (of the training split), gradients.
    """

    name = "mahalanobis-ensemble"
    needs = frozenset({"logits", "layers", "labels", "gradients"})
    tunes_on_source = True

    def __init__(self, *, epsilons: tuple[float, ...] = ENSEMBLE_EPSILONS, fgsm_epsilon: float = FGSM_EPSILON):
        if not epsilons or min(epsilons) < 0:
            raise PluginError(f"{self.name}: epsilons must be a non-empty list of numbers >= 0, got {epsilons}")
        self.epsilons = tuple(sorted({float(e) for e in epsilons}))
        self.epsilon = self.epsilons[0]
        self.fgsm_epsilon = float(fgsm_epsilon)
        self._gaussians: list[tuple[np.ndarray, np.ndarray]] = []
        self._memo: dict[tuple[float, bytes], np.ndarray] = {}
        self._regression: _Regression | None = None
        self._model: Classifier | None = None
        self._val: SplitView | None = None
        self._seed = 0
        self._validation_choice: tuple[dict[str, Any], float, Any] | None = None
        self.tuning_fpr95: dict[str, float] = {}

    def fit(self, ctx: FitContext) -> None:
        if not len(ctx.train):
            raise PluginError(f"{self.name}: the training split is empty")
        labels = ctx.train.labels
        self._memo = {}  # scores of the previous fit are stale
        self._gaussians = [fit_tied_gaussian(layer, labels, f"{self.name} (layer {i})")
                           for i, layer in enumerate(ctx.train.layers)]
        if not self._gaussians:
            raise PluginError(f"{self.name}: the classifier exposes no intermediate layers")
        if ctx.model is None:
            raise PluginError(f"{self.name} needs the classifier (FitContext.model) for input gradients")
        self._model, self._val, self._seed = ctx.model, ctx.val, ctx.seed

    def state_dict(self) -> dict[str, Any]:
        # The per-layer Gaussians; the per-source choice is tune()'s, made again for every source after loading,
        # and the validation fallback is recomputed from ctx.val when needed, as after fit.
        if not self._gaussians:
            raise PluginError(f"{self.name}: call fit() before state_dict()")
        state: dict[str, Any] = {"layers": len(self._gaussians)}
        for i, (whiten, centers) in enumerate(self._gaussians):
            state.update({f"layer{i}.whiten": whiten, f"layer{i}.centers": centers})
        return state

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self._model = classifier_of(ctx, self.name)
        self._val, self._seed, self._memo = ctx.val, ctx.seed, {}
        self._gaussians = [(state[f"layer{i}.whiten"], state[f"layer{i}.centers"]) for i in range(int(state["layers"]))]

    def layer_scores(self, view: SplitView, epsilon: float) -> np.ndarray:
        """N x L matrix of M_l(x) at noise magnitude ``epsilon``."""
        if epsilon == 0.0:
            return self._clean_scores(view.layers)
        return self._perturbed_scores(view.images.tensor(), (epsilon,))[epsilon]

    def _clean_scores(self, layers: list[np.ndarray]) -> np.ndarray:
        if not self._gaussians:
            raise PluginError(f"{self.name}: call fit() before scoring")
        return np.stack([-min_distance(w, c, layer) for (w, c), layer in zip(self._gaussians, layers)], 1)

    def _perturbed_scores(self, images: torch.Tensor, epsilons: tuple[float, ...]) -> dict[float, np.ndarray]:
        """M_l(x^_l) for each eps, computed once per (image, eps) and then read from a memo.

        Every source draws its positives from the same test set (each holding out other
        images), so without the memo the shared images would be perturbed again per source.
        """
        if self._model is None or not self._gaussians:
            raise PluginError(f"{self.name}: call fit() (with the classifier) before scoring")
        digests = [hashlib.blake2b(image.numpy().tobytes(), digest_size=16).digest() for image in images]
        missing = sorted({i for i, d in enumerate(digests) for e in epsilons if (e, d) not in self._memo})
        if missing:
            computed = self._compute_perturbed(images[missing], epsilons)
            for e in epsilons:
                for row, i in enumerate(missing):
                    self._memo[(e, digests[i])] = computed[e][row]
        empty = np.empty((0, len(self._gaussians)))
        return {e: np.stack([self._memo[(e, d)] for d in digests]) if digests else empty for e in epsilons}

    def _compute_perturbed(self, images: torch.Tensor, epsilons: tuple[float, ...]) -> dict[float, np.ndarray]:
        """Per layer one forward+backward (the direction), then one forward per eps."""
        model = self._model
        out = {e: np.empty((len(images), len(self._gaussians))) for e in epsilons}
        for index, (whiten, centers) in enumerate(self._gaussians):
            w, c = torch.from_numpy(whiten).to(model.device), torch.from_numpy(centers).to(model.device)
            direction = model.input_gradient(
                images, lambda logits, feats, maps, i=index: closest_distance_torch(maps[i], w, c), layers=True,
            ).sign()
            for epsilon in epsilons:
                maps = model.outputs_and_layers(images - epsilon * direction)[2]
                out[epsilon][:, index] = -min_distance(whiten, centers, maps[index].numpy())
        return out

    def _grid_scores(self, inputs: _Inputs) -> dict[float, np.ndarray]:
        noisy = tuple(e for e in self.epsilons if e > 0)
        scores = self._perturbed_scores(inputs.images, noisy) if noisy else {}
        if 0.0 in self.epsilons:
            layers = inputs.layers
            if layers is None:
                layers = [m.numpy() for m in self._model.outputs_and_layers(inputs.images)[2]]
            scores[0.0] = self._clean_scores(layers)
        return scores

    def _choose(self, positives: _Inputs, negatives: _Inputs) -> dict[str, Any]:
        """Regression per eps on the first halves, eps by FPR@95%TPR on the second halves."""
        if min(len(positives), len(negatives)) < MIN_HOLDOUT_PER_SIDE:
            raise PluginError(f"{self.name}: needs at least {MIN_HOLDOUT_PER_SIDE} positives and negatives to tune on, "
                              f"got {len(positives)} and {len(negatives)}")
        pos, neg = self._grid_scores(positives), self._grid_scores(negatives)
        half_pos, half_neg = len(positives) // 2, len(negatives) // 2
        best = None
        for epsilon in self.epsilons:
            x = np.concatenate([pos[epsilon][:half_pos], neg[epsilon][:half_neg]])
            y = np.r_[np.ones(half_pos), np.zeros(half_neg)]
            regression = _Regression.of(_fit_regression(x, y))
            fpr = fpr_at_tpr(regression.decision_function(pos[epsilon][half_pos:]),
                             regression.decision_function(neg[epsilon][half_neg:]), 0.95)
            self.tuning_fpr95[str(epsilon)] = float(fpr)
            if best is None or fpr < best[0]:
                best = (fpr, epsilon, regression)
        _, self.epsilon, self._regression = best
        return {"epsilon": self.epsilon, "layer_weights": self._regression.layer_weights()}

    def tune(self, holdout: Holdout) -> dict[str, Any]:
        n_pos, n_neg = len(holdout.positives), len(holdout.negatives)
        if min(n_pos, n_neg) >= MIN_HOLDOUT_PER_SIDE:
            return {"tuned_on": "holdout", **self._choose(_Inputs.of(holdout.positives), _Inputs.of(holdout.negatives))}
        choice = self.choose_on_validation()
        return {**choice, "tuned_on": f"validation FGSM: the holdout has {n_pos} positives and {n_neg} negatives, "
                                      f"fewer than {MIN_HOLDOUT_PER_SIDE} on a side"}

    def choose_on_validation(self) -> dict[str, Any]:
        """The choice on clean (positives) vs FGSM (negatives) validation images; computed once, then reused."""
        if self._validation_choice is None:
            val, model = self._val, self._model
            if val is None or model is None:
                raise PluginError(f"{self.name}: call fit() before tuning")
            clean = val.images.tensor()
            adversarial = fgsm(model, clean, val.labels, self.fgsm_epsilon)
            # _choose trains on the first half of each side: shuffle so both halves cover every class.
            order = np.random.default_rng(self._seed).permutation(len(clean))
            index = torch.from_numpy(order)
            choice = self._choose(_Inputs(clean[index], [layer[order] for layer in val.layers]),
                                  _Inputs(adversarial[index]))
            self._validation_choice = (choice, self.epsilon, self._regression)
        choice, self.epsilon, self._regression = self._validation_choice
        return dict(choice)

    def score(self, view: SplitView) -> np.ndarray:
        if self._regression is None:
            raise PluginError(f"{self.name}: not tuned; the core calls tune() before score()")
        return self._regression.decision_function(self.layer_scores(view, self.epsilon))

    def metadata(self) -> dict[str, Any]:
        return {"layers": len(self._gaussians), "layer_dims": [int(w.shape[0]) for w, _ in self._gaussians],
                "epsilon": self.epsilon, "tuning_fpr95_by_epsilon": dict(self.tuning_fpr95)}


class MahalanobisEnsembleNoOOD(MahalanobisEnsemble):
    """Mahalanobis feature ensemble tuned without OOD data: clean vs FGSM validation images (Lee et al.'s Table 2).

    Same paper, features, scores and regression as ``mahalanobis-ensemble``; the regression
    and eps are chosen in ``fit`` on the in-distribution validation split instead of on
    held-out source samples: positives are the clean validation images, negatives their FGSM
    versions (true labels, eps ``fgsm_epsilon`` = 0.05 pixel space, clipped to [0, 1]) —
    the paper's "validation on adversarial samples" setting, so no failure-source data is
    ever seen. The validation images are shuffled (by the seed) before halving. Higher =
    more trustworthy. Extra fit cost: one forward+backward per val image for FGSM, plus the
    grid on 2 x val images.
    Needs: layers, labels, gradients.
    """

    name = "mahalanobis-ensemble-nood"
    tunes_on_source = False

    def __init__(self, *, epsilons: tuple[float, ...] = ENSEMBLE_EPSILONS, fgsm_epsilon: float = FGSM_EPSILON):
        super().__init__(epsilons=epsilons, fgsm_epsilon=fgsm_epsilon)
        self.choice: dict[str, Any] = {}

    def fit(self, ctx: FitContext) -> None:
        super().fit(ctx)
        self.choice = self.choose_on_validation()

    def state_dict(self) -> dict[str, Any]:
        # fit's validation choice: eps, the regression and what tuning measured (the same as _validation_choice)
        gaussians = super().state_dict()  # raises before fit, which sets the regression too
        return {**gaussians, **with_prefix(self._regression.to_state(), "regression."),
                "epsilon": self.epsilon, "choice": dict(self.choice), "tuning_fpr95": dict(self.tuning_fpr95)}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        super().load_state_dict(state, ctx)
        self.epsilon, self.choice = float(state["epsilon"]), dict(state["choice"])
        self._regression = _Regression.from_state(under_prefix(state, "regression."))
        self.tuning_fpr95 = dict(state["tuning_fpr95"])
        self._validation_choice = (dict(self.choice), self.epsilon, self._regression)

    def metadata(self) -> dict[str, Any]:
        return {**super().metadata(), "choice": self.choice}
