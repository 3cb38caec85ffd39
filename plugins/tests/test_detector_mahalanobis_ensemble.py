"""Known-answer tests for Lee et al.'s feature ensemble: per-layer closed forms and scikit-learn's regression."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from oodbench.api import FitContext, Holdout, ImageSet, SplitView
from oodbench.classifier import ClassifierHandle
from oodbench.metrics import fpr_at_tpr
from oodbench_plugins.detectors.mahalanobis_ensemble import MahalanobisEnsemble, MahalanobisEnsembleNoOOD
from oodbench_plugins.detectors.odin import fgsm

CPU = torch.device("cpu")
# the reference regressions below are scikit-learn's defaults, whose announced changes do not concern these checks
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


class LinearLayers(torch.nn.Module):
    """Two intermediate layers A_l vec(x) (dims 5 and 3), logits B A_0 vec(x): every gradient has a closed form."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a0 = torch.nn.Linear(16, 5, bias=False)
        self.a1 = torch.nn.Linear(16, 3, bias=False)
        self.b = torch.nn.Linear(5, 4)

    def forward_layers(self, x: torch.Tensor):
        flat = x.flatten(1)
        first, second = self.a0(flat), self.a1(flat)
        return self.b(first), first, [first, second]

    def forward_features(self, x: torch.Tensor):
        return self.forward_layers(x)[:2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def pixel_classes(n: int, seed: int, spread: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prototypes = np.random.default_rng(100).uniform(0, 1, (4, 1, 4, 4))
    labels = rng.integers(0, 4, n)
    return (prototypes[labels] + rng.normal(0, spread, (n, 1, 4, 4))).astype(np.float32), labels


def view(model: ClassifierHandle, x: np.ndarray, labels: np.ndarray | None = None) -> SplitView:
    logits, feats, layers = model.outputs_and_layers(torch.from_numpy(x))
    model.passes.clear()
    return SplitView("v", logits.numpy(), feats.numpy(), ImageSet(x), labels, MahalanobisEnsemble.needs,
                     layers=[layer.numpy() for layer in layers])


def fitted(detector: MahalanobisEnsemble, model: ClassifierHandle, train: SplitView,
           val: SplitView | None = None) -> MahalanobisEnsemble:
    detector.fit(FitContext(train, val or train, 4, 0, CPU, model))
    return detector


def closed_form_layer_scores(model: ClassifierHandle, train: SplitView, x: np.ndarray, epsilon: float) -> np.ndarray:
    """M_l(x^_l) per layer, x^_l = x - eps sign(2 A_l^T P_l (A_l x - mu_lc*)), P_l = pinv(Sigma_l)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    columns = []
    for a, feats in zip((model.network.a0, model.network.a1), train.layers):
        a = a.weight.detach().double().numpy()
        feats, labels = feats.astype(np.float64), train.labels
        means = np.stack([feats[labels == c].mean(0) for c in range(4)])
        centered = feats - means[labels]
        precision = np.linalg.pinv(centered.T @ centered / len(feats))

        def distances(pixels: np.ndarray) -> np.ndarray:
            f = pixels @ a.T
            return np.stack([np.einsum("nd,de,ne->n", f - m, precision, f - m) for m in means], 1)

        closest = means[distances(flat).argmin(1)]
        grad = 2 * (flat @ a.T - closest) @ precision @ a
        columns.append(-distances(flat - epsilon * np.sign(grad)).min(1))
    return np.stack(columns, 1)


@pytest.fixture(scope="module")
def problem():
    model = ClassifierHandle(LinearLayers(), CPU)
    train = view(model, *pixel_classes(400, seed=1))
    return model, train


@pytest.mark.parametrize("epsilon", [0.0, 0.01])
def test_per_layer_scores_match_the_closed_form(problem, epsilon):
    model, train = problem
    x = pixel_classes(60, seed=2, spread=0.4)[0]
    detector = fitted(MahalanobisEnsemble(), model, train)
    got = detector.layer_scores(view(model, x), epsilon)
    np.testing.assert_allclose(got, closed_form_layer_scores(model, train, x, epsilon), rtol=1e-4)
    if epsilon:
        # each layer is preprocessed along its own gradient: one forward+backward and one forward per layer
        assert model.passes["other"] == {"forward_backward": 2 * 60, "forward": 2 * 60}
        assert (got > detector.layer_scores(view(model, x), 0.0)).all(), "a small step towards the class raises M_l"
    else:
        assert model.passes == {}, "eps = 0 reads the cached layer outputs"


def test_tune_is_sklearn_regression_on_first_halves_and_eps_by_fpr_on_second_halves(problem):
    model, train = problem
    epsilons = (0.0, 0.005, 0.05)
    positives = view(model, pixel_classes(40, seed=3)[0])
    negatives = view(model, pixel_classes(40, seed=4, spread=0.5)[0])
    detector = fitted(MahalanobisEnsemble(epsilons=epsilons), model, train)
    choice = detector.tune(Holdout("ood:x", positives, negatives))

    expected = {}
    for e in epsilons:
        pos, neg = detector.layer_scores(positives, e), detector.layer_scores(negatives, e)
        regression = make_pipeline(StandardScaler(), LogisticRegressionCV(scoring="accuracy", max_iter=1000))
        regression.fit(np.r_[pos[:20], neg[:20]], np.r_[np.ones(20), np.zeros(20)])
        expected[e] = (fpr_at_tpr(regression.decision_function(pos[20:]), regression.decision_function(neg[20:]), 0.95),
                       regression)
    assert detector.tuning_fpr95 == pytest.approx({str(e): fpr for e, (fpr, _) in expected.items()})
    best = min(epsilons, key=lambda e: expected[e][0])
    assert choice["epsilon"] == detector.epsilon == best and choice["tuned_on"] == "holdout"
    test = view(model, pixel_classes(30, seed=5, spread=0.3)[0])
    np.testing.assert_allclose(detector.score(test),
                               expected[best][1].decision_function(detector.layer_scores(test, best)), rtol=1e-9)
    regression = expected[best][1]
    np.testing.assert_allclose(choice["layer_weights"], regression[-1].coef_[0] / regression[0].scale_, rtol=1e-9)


def test_small_holdout_falls_back_to_the_fgsm_validation_choice(problem):
    model, train = problem
    x, labels = pixel_classes(60, seed=6)
    val = view(model, x, labels)
    few = Holdout("mistakes", view(model, pixel_classes(30, seed=7)[0]), view(model, pixel_classes(3, seed=8)[0]))
    options = {"epsilons": (0.0, 0.01), "fgsm_epsilon": 0.2}
    detector = fitted(MahalanobisEnsemble(**options), model, train, val)
    choice = detector.tune(few)
    assert "30 positives and 3 negatives" in choice["tuned_on"]
    reference = fitted(MahalanobisEnsembleNoOOD(**options), model, train, val)
    assert {k: v for k, v in choice.items() if k != "tuned_on"} == reference.choice
    test = view(model, pixel_classes(20, seed=9)[0])
    np.testing.assert_array_equal(detector.score(test), reference.score(test))


def test_nood_tunes_on_clean_against_fgsm_validation_images(problem):
    model, train = problem
    x, labels = pixel_classes(60, seed=10)
    detector = fitted(MahalanobisEnsembleNoOOD(epsilons=(0.0,), fgsm_epsilon=0.2), model, train, view(model, x, labels))
    assert not MahalanobisEnsembleNoOOD.tunes_on_source
    # the FGSM images themselves, then the regression at eps = 0: positives (clean) must beat them
    order = np.random.default_rng(0).permutation(60)
    clean = detector.layer_scores(view(model, x[order]), 0.0)
    adversarial = fgsm(model, torch.from_numpy(x[order]), labels[order], 0.2).numpy()
    negatives = detector.layer_scores(view(model, adversarial), 0.0)
    regression = make_pipeline(StandardScaler(), LogisticRegressionCV(scoring="accuracy", max_iter=1000))
    regression.fit(np.r_[clean[:30], negatives[:30]], np.r_[np.ones(30), np.zeros(30)])
    np.testing.assert_allclose(detector.choice["layer_weights"], regression[-1].coef_[0] / regression[0].scale_,
                               rtol=1e-9)


def test_classifier_without_layers_is_a_clear_error(problem):
    _, train = problem
    bare = SplitView("bare", train.logits, train.logits, ImageSet(np.zeros((len(train), 1, 4, 4), np.float32)),
                     train.labels, MahalanobisEnsemble.needs)
    with pytest.raises(Exception, match="no forward_layers"):
        MahalanobisEnsemble().fit(FitContext(bare, bare, 4, 0, CPU, None))


def test_images_shared_by_sources_are_perturbed_once(problem):
    model, train = problem
    x = pixel_classes(50, seed=11, spread=0.4)[0]
    detector = fitted(MahalanobisEnsemble(), model, train)
    first = detector.layer_scores(view(model, x[:30]), 0.01)
    assert model.passes["other"] == {"forward_backward": 2 * 30, "forward": 2 * 30}
    model.passes.clear()
    # a second source's positives: 20 of the same images and 20 new ones
    again = detector.layer_scores(view(model, x[10:50]), 0.01)
    assert model.passes["other"] == {"forward_backward": 2 * 20, "forward": 2 * 20}
    np.testing.assert_array_equal(again[:20], first[10:30])
    np.testing.assert_allclose(again, closed_form_layer_scores(model, train, x[10:50], 0.01), rtol=1e-4)
