"""Issue 21's logit- and head-based post-hoc detectors: energy, entropy, GEN, KL-matching, ReAct, ASH, SCALE,
DICE and GradNorm.

Each is checked on a tiny case against a closed form computed here, against pytorch-ood 0.4 on
the same logits / features / head (pytorch-ood returns outlier scores, higher = more OOD, so
ours are the negation, up to the differences named in the detectors' docstrings), at the
settings where it must reduce to the energy score, through the test kit, and for adding no
classifier pass.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from oodbench.api import ClassifierHandle, FitContext, ImageSet, PluginError, SplitView
from oodbench.testing import check_detector
from oodbench_plugins.detectors.activation_shaping import ASHB, ASHP, ASHS, DICE, ReAct, Scale
from oodbench_plugins.detectors.gradient_scores import GradNorm
from oodbench_plugins.detectors.logit_scores import GEN, Energy, Entropy, KLMatching
from oodbench_plugins.detectors.softmax import MaxLogit

pytorch_ood = pytest.importorskip("pytorch_ood")

ALL = (Energy, Entropy, GEN, KLMatching, ReAct, ASHP, ASHB, ASHS, Scale, DICE, GradNorm)
HEAD = (ReAct, ASHP, ASHB, ASHS, Scale, DICE, GradNorm)
RTOL = 1e-5


class _LinearNet(torch.nn.Module):
    """A classifier whose penultimate features are its flattened input and whose head is one nn.Linear."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, affine: bool = True):
        super().__init__()
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(torch.tensor(weight))
            linear.bias.copy_(torch.tensor(bias))
        # a non-affine head that computes the same logits: head_weight_bias() is then None
        self.head = linear if affine else torch.nn.Sequential(linear, torch.nn.Identity())

    def forward_features(self, x):
        flat = x.flatten(1)
        return self.head(flat), flat

    def forward(self, x):
        return self.forward_features(x)[0]


def _handle(weight, bias, affine=True) -> ClassifierHandle:
    return ClassifierHandle(_LinearNet(np.asarray(weight, np.float32), np.asarray(bias, np.float32), affine),
                            torch.device("cpu"), batch_size=16)


def _view(name, features, weight=None, bias=None, logits=None) -> SplitView:
    features = np.asarray(features, np.float32)
    if logits is None:
        logits = features.astype(np.float64) @ np.asarray(weight, np.float64).T + np.asarray(bias, np.float64)
    images = ImageSet(np.zeros((len(features), 1, 1, 1), np.float32), None, name)
    return SplitView(name, np.asarray(logits, np.float32), features, images, None,
                     frozenset({"logits", "features", "head"}))


def _logit_view(logits) -> SplitView:
    logits = np.asarray(logits, np.float32)
    return _view("logits", np.zeros((len(logits), 1)), logits=logits)


def _fit(detector, train, val=None, handle=None):
    ctx = FitContext(train, val if val is not None else train, train.logits.shape[1], 0, torch.device("cpu"), handle)
    detector.fit(ctx)
    return detector


# ------------------------------------------------------------------------------------------------
# Known answers, by hand
# ------------------------------------------------------------------------------------------------
def test_logit_scores_on_two_classes_by_hand():
    view = _logit_view([[0.0, np.log(3.0)]])  # p = (1/4, 3/4)
    np.testing.assert_allclose(Energy().score(view), [np.log(4.0)], rtol=1e-7)
    np.testing.assert_allclose(Energy(temperature=2.0).score(view), [2 * np.log(1 + np.sqrt(3.0))], rtol=1e-7)
    np.testing.assert_allclose(Entropy().score(view), [0.25 * np.log(0.25) + 0.75 * np.log(0.75)], rtol=1e-7)
    term = (0.25 * 0.75) ** 0.1  # p^g (1 - p)^g is the same for both classes when C = 2
    np.testing.assert_allclose(GEN().score(view), [-2 * term], rtol=1e-7)
    np.testing.assert_allclose(GEN(M=1).score(view), [-term], rtol=1e-7)
    np.testing.assert_allclose(GEN(gamma=1.0, M=1).score(view), [-0.1875], rtol=1e-7)
    np.testing.assert_allclose(MaxLogit().score(view), [np.log(3.0)], rtol=1e-7)


def test_gen_and_entropy_keep_confident_inputs_apart_where_a_float_softmax_saturates():
    view = _logit_view([[0.0, 40.0], [0.0, 50.0], [0.0, 60.0]])  # p_max rounds to 1 in float64
    for detector in (GEN(), Entropy()):
        scores = detector.score(view)
        assert np.all(np.isfinite(scores)) and scores[0] < scores[1] < scores[2], (detector.name, scores)
    # -G = -2 (p q)^0.1 with q = 1 - p_max = e^-40 / (1 + e^-40), exactly
    q = np.exp(-40.0) / (1 + np.exp(-40.0))
    np.testing.assert_allclose(GEN().score(view)[0], -2 * (q * (1 - q)) ** 0.1, rtol=1e-9)


def test_kl_matching_by_hand_fits_templates_on_the_validation_split():
    val = _logit_view([[np.log(3.0), 0.0], [0.0, np.log(3.0)], [0.0, np.log(3.0)]])  # d0 = (3/4, 1/4), d1 = (1/4, 3/4)
    train = _logit_view([[5.0, 0.0]])  # must not be used
    detector = _fit(KLMatching(), train, val)
    np.testing.assert_allclose(detector.templates, [[0.75, 0.25], [0.25, 0.75]], rtol=1e-7)
    assert detector.classes.tolist() == [0, 1]
    scores = detector.score(_logit_view([[0.0, 0.0], [np.log(3.0), 0.0], [0.0, 5.0]]))
    p = softmax([0.0, 5.0])
    expected = [-0.5 * np.log(4 / 3),  # KL((1/2, 1/2) || d_k) is the same for both templates
                0.0,  # the template itself
                -min(np.sum(p * np.log(p / [0.75, 0.25])), np.sum(p * np.log(p / [0.25, 0.75])))]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-7)
    # a class that the classifier never predicts on the validation split has no template
    only0 = _fit(KLMatching(), train, _logit_view([[1.0, 0.0], [2.0, 0.0]]))
    assert only0.classes.tolist() == [0]


W2 = np.array([[1.0, 0.0, 0.5, -1.0], [0.0, 1.0, -0.5, 2.0]])
B2 = np.array([0.5, -0.25])
H = np.array([[1.0, 4.0, 2.0, 3.0]])


def _shaped_energy(shaped):
    return logsumexp(np.asarray(shaped, np.float64) @ W2.T + B2, axis=1)


def test_react_by_hand():
    handle = _handle(W2, B2)
    train = _view("train", np.arange(12.0).reshape(3, 4), W2, B2)  # the 50th percentile of 0..11 is 5.5
    detector = _fit(ReAct(percentile=50), train, handle=handle)
    assert detector.threshold == 5.5
    test = _view("test", [[1.0, 9.0, 2.0, 7.0]], W2, B2)
    np.testing.assert_allclose(detector.score(test), _shaped_energy([[1.0, 5.5, 2.0, 5.5]]), rtol=1e-6)


def test_ash_and_scale_by_hand():
    handle = _handle(W2, B2)
    view = _view("test", H, W2, B2)  # percentile 50 of D = 4 keeps k = 2 units: 4 and 3; s1 = 10, s2 = 7
    expected = {
        ASHP: [[0.0, 4.0, 0.0, 3.0]],
        ASHB: [[0.0, 5.0, 0.0, 5.0]],  # s1 / k
        ASHS: [[0.0, 4.0 * np.exp(10 / 7), 0.0, 3.0 * np.exp(10 / 7)]],
        Scale: H * np.exp(10 / 7),  # not pruned
    }
    for cls, shaped in expected.items():
        detector = _fit(cls(percentile=50), view, handle=handle)
        np.testing.assert_allclose(detector.score(view), _shaped_energy(shaped), rtol=1e-6, err_msg=cls.name)
    # percentile 40 of 4 units: k = 4 - round(1.6) = 2 as well; percentile 30: k = 4 - round(1.2) = 3
    np.testing.assert_allclose(_fit(ASHP(percentile=30), view, handle=handle).score(view),
                               _shaped_energy([[0.0, 4.0, 2.0, 3.0]]), rtol=1e-6)


def test_dice_by_hand():
    handle = _handle(W2, B2)
    train = _view("train", [[1.0, 2.0, 2.0, 1.0], [3.0, 2.0, 0.0, 1.0]], W2, B2)  # mean (2, 2, 1, 1)
    # contributions W * mean: [[2, 0, 0.5, -1], [0, 2, -0.5, 2]], sorted -1, -.5, 0, 0, .5, 2, 2, 2: their
    # 50th percentile lies halfway between the 4th and 5th, 0.25; the weights above it are kept
    contribution = W2 * np.array([2.0, 2.0, 1.0, 1.0])
    assert np.percentile(contribution, 50) == pytest.approx(0.25)
    detector = _fit(DICE(sparsity=50), train, handle=handle)
    assert detector.threshold == pytest.approx(0.25)
    mask = np.array([[True, False, True, False], [False, True, False, True]])
    np.testing.assert_array_equal(detector.mask, mask)
    np.testing.assert_allclose(detector.score(_view("test", H, W2, B2)),
                               logsumexp(H @ (W2 * mask).T + B2, axis=1), rtol=1e-9)


def test_gradnorm_by_hand_and_by_autograd():
    weight = np.array([[1.0, -2.0], [0.5, 1.0]])
    bias = np.array([0.0, np.log(3.0)])
    handle = _handle(weight, bias)
    view = _view("test", [[0.0, 0.0], [1.0, -2.0]], weight, bias)
    detector = _fit(GradNorm(), view, handle=handle)
    # first input: h = 0, so the gradient is 0; second: logits (5, -1.5 + log 3)
    p = softmax(np.array([5.0, -1.5 + np.log(3.0)]))
    np.testing.assert_allclose(detector.score(view), [0.0, np.abs(p - 0.5).sum() * 3.0], rtol=1e-6)

    rng = np.random.default_rng(3)
    w, b, h = rng.normal(size=(5, 6)), rng.normal(size=5), rng.normal(size=(4, 6))
    view = _view("test", h, w, b)
    for t in (1.0, 2.5):
        detector = _fit(GradNorm(temperature=t), view, handle=_handle(w, b))
        expected = []
        for row in view.features.astype(np.float64):
            weight_t = torch.tensor(w, requires_grad=True)
            logits = (weight_t @ torch.tensor(row) + torch.tensor(b)) / t
            kl = (-(1 / 5) * torch.log_softmax(logits, 0)).sum() - np.log(5)  # KL(u || softmax)
            (grad,) = torch.autograd.grad(kl, weight_t)
            expected.append(grad.abs().sum().item())
        np.testing.assert_allclose(detector.score(view), expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# pytorch-ood 0.4 on the same inputs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def problem():
    """Random logits, non-negative (post-ReLU) features and an affine head with a bias far from zero."""
    rng = np.random.default_rng(0)
    classes, dim = 7, 20
    weight = rng.normal(0, 0.5, (classes, dim))
    bias = np.linspace(-1, 1, classes)
    train = np.maximum(rng.normal(0.3, 1, (200, dim)), 0).astype(np.float32)
    test = np.maximum(rng.normal(0.3, 1, (50, dim)), 0).astype(np.float32)
    linear = torch.nn.Linear(dim, classes).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight.astype(np.float32)))
        linear.bias.copy_(torch.tensor(bias.astype(np.float32)))
    handle = _handle(weight, bias)
    train_view, test_view = _view("train", train, weight, bias), _view("test", test, weight, bias)
    return {"handle": handle, "train": train_view, "test": test_view, "linear": linear,
            "weight": linear.weight.detach(), "bias": linear.bias.detach()}


def _t(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array, np.float64))


def test_logit_scores_match_pytorch_ood(problem):
    from pytorch_ood.detector import GEN as TheirGEN
    from pytorch_ood.detector import EnergyBased, Entropy as TheirEntropy, KLMatching as TheirKL

    test, train = problem["test"], problem["train"]
    logits = _t(test.logits)
    for t in (1.0, 2.0):
        np.testing.assert_allclose(Energy(temperature=t).score(test), -EnergyBased.score(logits, t=t).numpy(), rtol=RTOL)
    np.testing.assert_allclose(Entropy().score(test), -TheirEntropy.score(logits).numpy(), rtol=RTOL)
    # pytorch-ood averages the M terms where the authors' code (and ours) sums them: ours = -M * theirs
    np.testing.assert_allclose(GEN().score(test), -7 * TheirGEN.score(logits, gamma=0.1).numpy(), rtol=RTOL)
    np.testing.assert_allclose(GEN(M=3, gamma=0.5).score(test), -3 * TheirGEN.score(logits, gamma=0.5, M=3).numpy(),
                               rtol=RTOL)
    theirs = TheirKL(None).fit_logits(_t(train.logits))
    ours = _fit(KLMatching(), test, val=train)  # fitted on the validation split, here `train`
    np.testing.assert_allclose(ours.score(test), -theirs.predict_logits(logits).numpy(), rtol=RTOL)


def test_head_detectors_match_pytorch_ood(problem):
    from pytorch_ood.detector import ASH, DICE as TheirDICE, SCALE, ReAct as TheirReAct

    handle, train, test, linear = problem["handle"], problem["train"], problem["test"], problem["linear"]
    maps = _t(test.features)[:, :, None, None]  # pytorch-ood's ASH/SCALE/ReAct shape B x C x H x W maps

    def head(x):
        return linear(x.flatten(1))

    for p in (50.0, 90.0):
        ours = _fit(ReAct(percentile=p), train, handle=handle)
        theirs = TheirReAct(backbone=None, head=head, percentile=p / 100)
        theirs.fit_feature_maps(_t(train.features)[:, :, None, None], torch.zeros(len(train.features)))
        assert ours.threshold == pytest.approx(theirs.threshold, rel=1e-12)
        np.testing.assert_allclose(ours.score(test), -theirs.predict_feature_maps(maps).numpy(), rtol=RTOL)

    for variant, cls in (("ash-p", ASHP), ("ash-b", ASHB), ("ash-s", ASHS)):
        for p in (65.0, 90.0):
            theirs = ASH(backbone=None, head=head, variant=variant, percentile=p / 100)
            ours = _fit(cls(percentile=p), train, handle=handle)
            np.testing.assert_allclose(ours.score(test), -theirs.predict_feature_maps(maps).numpy(), rtol=RTOL,
                                       err_msg=f"{variant}@{p}")

    for p in (65.0, 85.0):
        theirs = SCALE(backbone=None, head=head, percentile=p / 100)
        np.testing.assert_allclose(_fit(Scale(percentile=p), train, handle=handle).score(test),
                                   -theirs.predict_feature_maps(maps).numpy(), rtol=RTOL, err_msg=f"scale@{p}")

    for p in (50.0, 90.0):
        theirs = TheirDICE(None, problem["weight"], problem["bias"], p=p / 100)
        theirs.fit_features(_t(train.features), torch.zeros(len(train.features)))
        ours = _fit(DICE(sparsity=p), train, handle=handle)
        np.testing.assert_array_equal(ours.mask, (theirs.masked_w != 0).numpy())
        np.testing.assert_allclose(ours.score(test), -theirs.predict_features(_t(test.features)).numpy(), rtol=RTOL)


def test_gradnorm_matches_pytorch_ood_on_the_last_layers_weight(problem):
    from pytorch_ood.detector import GradNorm as TheirGradNorm

    handle, test, linear = problem["handle"], problem["test"], problem["linear"]
    features = _t(test.features)
    for t in (1.0, 2.0):
        theirs = TheirGradNorm(linear, param_filter=lambda name: name == "weight", temperature=t)
        ours = _fit(GradNorm(temperature=t), test, handle=handle)
        np.testing.assert_allclose(ours.score(test), -theirs.predict(features).numpy(), rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Where each reduces to the energy score
# ------------------------------------------------------------------------------------------------
def test_the_settings_that_prune_nothing_give_the_energy_score(problem):
    handle, train, test = problem["handle"], problem["train"], problem["test"]
    energy = Energy().score(train)
    np.testing.assert_allclose(_fit(ReAct(percentile=100), train, handle=handle).score(train), energy, rtol=1e-6)
    np.testing.assert_allclose(_fit(ASHP(percentile=0), train, handle=handle).score(train), energy, rtol=1e-6)
    np.testing.assert_allclose(_fit(DICE(sparsity=0), train, handle=handle).score(train), energy, rtol=1e-6)
    # ASH-S at 0 prunes nothing but scales every input by e (s1 / s2 = 1); SCALE at 0 alike
    h = test.features.astype(np.float64)
    scaled = logsumexp(np.e * h @ problem["weight"].numpy().T + problem["bias"].numpy(), axis=1)
    for cls in (ASHS, Scale):
        np.testing.assert_allclose(_fit(cls(percentile=0), train, handle=handle).score(test), scaled, rtol=1e-6)
    # and the defaults do prune
    for detector in (ReAct(), ASHP(), DICE()):
        assert not np.allclose(_fit(detector, train, handle=handle).score(train), energy, rtol=1e-3), detector.name


# ------------------------------------------------------------------------------------------------
# The contract
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [cls for cls in ALL if cls not in (ASHS, Scale)], ids=lambda cls: cls.name)
def test_the_test_kit_passes(cls):
    assert check_detector(cls) == []


@pytest.mark.parametrize("cls", (ASHS, Scale), ids=lambda cls: cls.name)
def test_ash_s_and_scale_pass_the_kit_but_rank_its_toy_negatives_higher_at_their_defaults(cls):
    """The kit's features are pixels: a positive lights 4 of 16 at 0.8, a negative (a midpoint of two
    prototypes) 8 at 0.5. When fewer units than 4 are kept, s1 / s2 is larger for the flatter negatives,
    so exp(s1 / s2) scales them up more: their energy is higher. That is the method (pytorch-ood agrees,
    test_head_detectors_match_pytorch_ood), not a flipped sign; the rest of the contract holds."""
    assert check_detector(cls, {"percentile": 50}) == []
    problems = check_detector(cls)
    assert len(problems) == 1 and problems[0].startswith("scores look inverted"), problems


@pytest.mark.parametrize("cls, options", [(ReAct, {"percentile": 100}), (ASHP, {"percentile": 0}),
                                          (DICE, {"sparsity": 0}), (GEN, {"M": 2}), (Energy, {"temperature": 1000})])
def test_the_test_kit_passes_at_the_edges(cls, options):
    assert check_detector(cls, options) == []


def test_head_detectors_add_no_classifier_pass(problem):
    handle, train, test = problem["handle"], problem["train"], problem["test"]
    before = {k: dict(v) for k, v in handle.passes.items()}
    for cls in HEAD:
        _fit(cls(), train, handle=handle).score(test)
    assert handle.passes == before


def test_detectors_that_need_an_affine_head_say_so():
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(3, 4)), np.zeros(3)
    handle = _handle(weight, bias, affine=False)
    train = _view("train", rng.random((10, 4)), weight, bias)
    for cls in (DICE, GradNorm):
        with pytest.raises(PluginError, match="affine"):
            _fit(cls(), train, handle=handle)
    # the others take any head
    for cls in (ReAct, ASHP, ASHB, ASHS, Scale):
        scores = _fit(cls(), train, handle=handle).score(train)
        np.testing.assert_allclose(scores, _fit(cls(), train, handle=_handle(weight, bias)).score(train), rtol=1e-6)


def test_head_detectors_load_only_with_the_classifier(problem):
    handle, train, test = problem["handle"], problem["train"], problem["test"]
    for cls in HEAD:
        fitted = _fit(cls(), train, handle=handle)
        state = fitted.state_dict()
        with pytest.raises(PluginError, match="ctx.model"):
            cls().load_state_dict(state, None)
        loaded = cls()
        loaded.load_state_dict(state, FitContext(train, train, 7, 0, torch.device("cpu"), handle))
        np.testing.assert_array_equal(loaded.score(test), fitted.score(test))


def test_registered_names(registry):
    names = {"energy": Energy, "entropy": Entropy, "gen": GEN, "kl-matching": KLMatching, "react": ReAct,
             "ash-p": ASHP, "ash-b": ASHB, "ash-s": ASHS, "scale": Scale, "dice": DICE, "gradnorm": GradNorm,
             "maxlogit": MaxLogit, "logits": MaxLogit}
    for name, cls in names.items():
        assert registry.get("detectors", name).target is cls, name
