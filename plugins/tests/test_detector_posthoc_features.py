"""Feature-based post-hoc detectors (issue 21): KNN, RMDS, ViM, SHE, NNGuide, fDBD, NCI.

Each is checked against an independent computation of its paper's formula on a tiny case (loops,
scikit-learn's NearestNeighbors, scipy's mahalanobis, the ViM authors' own steps), against
pytorch-ood 0.4 where it implements the method (its outlier scores are ours negated, up to the
differences each test names), and through the test kit.
"""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import mahalanobis
from scipy.special import logsumexp
from sklearn.neighbors import NearestNeighbors

from oodbench.api import FitContext, ImageSet, PluginError, SplitView
from oodbench.testing import ToyProblem, check_detector
from oodbench_plugins.detectors.feature_scores import FDBD, NCI, RMDS, SHE, ViM, vim_dimension
from oodbench_plugins.detectors.knn import KNN, NNGuide

ALL = (KNN, RMDS, ViM, SHE, NNGuide, FDBD, NCI)
ALLOWED = frozenset({"logits", "features", "labels", "head"})


class _Linear:
    """The part of the classifier these detectors use: an affine head (W, b)."""

    def __init__(self, weight, bias):
        self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)

    def head_weight_bias(self):
        return self.weight.copy(), self.bias.copy()

    def head(self, features):
        return (np.asarray(features, np.float64) @ self.weight.T + self.bias).astype(np.float32)


def _view(name, features, logits, labels=None, allowed=ALLOWED):
    n = len(features)
    images = ImageSet(np.zeros((n, 1, 1, 1), np.float32), labels, name, logits.shape[1])
    return SplitView(name, np.asarray(logits, np.float32), np.asarray(features, np.float32), images, labels, allowed)


@pytest.fixture(scope="module")
def toy():
    """The test kit's problem: 16-dim features, 4 classes, an affine head; (train, queries, ctx, W, b)."""
    problem = ToyProblem(0)
    train = problem.view("train", problem.train, problem.train_y, ALLOWED)
    val = problem.view("val", problem.val, problem.val_y, ALLOWED)
    scoring = ALLOWED - {"labels"}
    queries = problem.view("queries", np.concatenate([problem.pos, problem.neg]), None, scoring)
    ctx = FitContext(train, val, problem.classes, 0, torch.device("cpu"), problem.handle)
    weight, bias = problem.handle.head_weight_bias()
    return train, queries, ctx, weight, bias


def _fitted(cls, ctx, **options):
    detector = cls(**options)
    detector.fit(ctx)
    return detector


def _normalised(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- known answers ----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 50])
def test_knn_is_minus_the_distance_to_the_kth_normalised_training_neighbour(toy, k):
    train, queries, ctx, _, _ = toy
    search = NearestNeighbors(n_neighbors=k).fit(_normalised(train.features))
    expected = -search.kneighbors(_normalised(queries.features))[0][:, -1]
    np.testing.assert_allclose(_fitted(KNN, ctx, k=k).score(queries), expected, rtol=1e-10, atol=1e-12)


def test_knn_clamps_k_to_the_training_set_and_keeps_zero_features_finite(toy):
    train, queries, ctx, _, _ = toy
    detector = _fitted(KNN, ctx, k=10_000)
    assert detector.metadata() == {"k_used": len(train), "bank_size": len(train)}
    search = NearestNeighbors(n_neighbors=len(train)).fit(_normalised(train.features))
    np.testing.assert_allclose(detector.score(queries), -search.kneighbors(_normalised(queries.features))[0][:, -1],
                               rtol=1e-10)
    zero = _view("zero", np.zeros((2, 16)), np.zeros((2, 4)), allowed=ALLOWED - {"labels"})
    np.testing.assert_allclose(detector.score(zero), -1.0)  # a zero feature is at distance 1 from every unit vector


def test_rmds_is_the_relative_mahalanobis_distance_by_scipy(toy):
    train, queries, ctx, _, _ = toy
    z, y = train.features.astype(np.float64), train.labels
    means = np.stack([z[y == c].mean(0) for c in range(4)])
    within = sum((z[y == c] - means[c]).T @ (z[y == c] - means[c]) for c in range(4)) / len(z)
    mean0 = z.mean(0)
    total = (z - mean0).T @ (z - mean0) / len(z)
    precision, precision0 = np.linalg.pinv(within), np.linalg.pinv(total)
    expected = [-min(mahalanobis(q, means[c], precision) ** 2 - mahalanobis(q, mean0, precision0) ** 2
                     for c in range(4)) for q in queries.features.astype(np.float64)]
    np.testing.assert_allclose(_fitted(RMDS, ctx).score(queries), expected, rtol=1e-8, atol=1e-8)


def test_vim_follows_the_authors_steps(toy):
    """The ViM authors' benchmark.py, step by step (with their np.linalg.eig), on the toy problem."""
    train, queries, ctx, w, b = toy
    dim = 6
    h_train, h = train.features.astype(np.float64), queries.features.astype(np.float64)
    u = -np.matmul(np.linalg.pinv(w), b)
    centered = h_train - u
    eig_vals, eigen_vectors = np.linalg.eig(centered.T @ centered / len(centered))
    ns = np.ascontiguousarray((eigen_vectors.T[np.argsort(eig_vals * -1)[dim:]]).T)
    alpha = (h_train @ w.T + b).max(axis=-1).mean() / np.linalg.norm((h_train - u) @ ns, axis=-1).mean()
    expected = logsumexp(h @ w.T + b, axis=-1) - alpha * np.linalg.norm((h - u) @ ns, axis=-1)
    detector = _fitted(ViM, ctx, dim=dim)
    assert detector.metadata()["alpha"] == pytest.approx(alpha, rel=1e-9)
    np.testing.assert_allclose(detector.score(queries), expected, rtol=1e-9)


def test_vim_dimension_rule_and_bounds(toy):
    assert [vim_dimension(n) for n in (4096, 2048, 1024, 768, 512, 64, 16, 1)] == [1000, 1000, 512, 512, 256, 32, 8, 1]
    _, _, ctx, _, _ = toy
    assert _fitted(ViM, ctx).metadata()["dim"] == 8  # 16-dim toy features: half
    with pytest.raises(PluginError, match="no residual"):
        _fitted(ViM, ctx, dim=16)


def test_she_is_the_inner_product_with_the_predicted_class_mean_of_correct_training_features():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(40, 5))
    logits = rng.normal(size=(40, 3))
    labels = rng.integers(0, 3, 40)
    labels[labels == 2] = 0
    labels[np.flatnonzero(logits.argmax(1) != 2)[:3]] = 2  # none labelled 2 is predicted 2: it falls back to all three
    train = _view("train", features, logits, labels)
    ctx = FitContext(train, train, 3, 0, torch.device("cpu"))
    detector = _fitted(SHE, ctx)
    h, predictions = train.features.astype(np.float64), train.predictions
    patterns = {}
    for c in range(3):
        correct = [i for i in range(40) if labels[i] == c and predictions[i] == c]
        patterns[c] = h[correct or [i for i in range(40) if labels[i] == c]].mean(0)
    queries = _view("q", rng.normal(size=(30, 5)), rng.normal(size=(30, 3)), allowed=ALLOWED - {"labels"})
    expected = [float(np.dot(q, patterns[p])) for q, p in zip(queries.features.astype(np.float64), queries.predictions)]
    np.testing.assert_allclose(detector.score(queries), expected, rtol=1e-12)
    assert detector.metadata()["fallback_classes"] == [2]


def test_she_without_training_samples_of_a_class_is_an_error():
    features, logits = np.ones((4, 2)), np.eye(3)[[0, 1, 0, 1]]
    train = _view("train", features, logits, np.array([0, 1, 0, 1]))
    with pytest.raises(PluginError, match="class 2 has no training samples"):
        _fitted(SHE, FitContext(train, train, 3, 0, torch.device("cpu")))


@pytest.mark.parametrize("k", [1, 10, 300])
def test_nnguide_is_energy_times_the_mean_of_the_k_largest_inner_products_with_the_scaled_bank(toy, k):
    train, queries, ctx, _, _ = toy
    bank = _normalised(train.features) * logsumexp(train.logits.astype(np.float64), axis=1)[:, None]
    k_used = min(k, len(bank))
    expected = []
    for q, logits in zip(_normalised(queries.features), queries.logits.astype(np.float64)):
        products = sorted((float(np.dot(q, b)) for b in bank), reverse=True)
        expected.append(logsumexp(logits) * np.mean(products[:k_used]))
    np.testing.assert_allclose(_fitted(NNGuide, ctx, k=k).score(queries), expected, rtol=1e-10)


def test_fdbd_by_an_explicit_loop_over_boundaries(toy):
    train, queries, ctx, w, b = toy
    mean = train.features.astype(np.float64).mean(0)
    expected = []
    for h, p in zip(queries.features.astype(np.float64), queries.predictions):
        distances = [abs((w[p] - w[c]) @ h + b[p] - b[c]) / np.linalg.norm(w[p] - w[c]) for c in range(4) if c != p]
        expected.append(np.mean(distances) / np.linalg.norm(h - mean))
    np.testing.assert_allclose(_fitted(FDBD, ctx).score(queries), expected, rtol=1e-10)


def test_fdbd_refuses_two_classes_with_one_weight_vector():
    train = _view("train", np.eye(3), np.eye(3), np.arange(3))
    ctx = FitContext(train, train, 3, 0, torch.device("cpu"), _Linear([[1, 0, 0], [1, 0, 0], [0, 0, 1]], [0, 0, 0]))
    with pytest.raises(PluginError, match="same weight vector"):
        _fitted(FDBD, ctx)


@pytest.mark.parametrize("alpha", [0.0, 1e-4, 0.5])
def test_nci_by_an_explicit_loop(toy, alpha):
    train, queries, ctx, w, _ = toy
    mean = train.features.astype(np.float64).mean(0)
    expected = [w[p] @ (h - mean) / np.linalg.norm(h - mean) + alpha * np.abs(h).sum()
                for h, p in zip(queries.features.astype(np.float64), queries.predictions)]
    np.testing.assert_allclose(_fitted(NCI, ctx, alpha=alpha).score(queries), expected, rtol=1e-10)


@pytest.mark.parametrize("cls", [ViM, FDBD, NCI])
def test_head_detectors_need_an_affine_head(cls):
    class NotAffine(_Linear):
        def head_weight_bias(self):
            return None

    train = _view("train", np.eye(3), np.eye(3), np.arange(3))
    with pytest.raises(PluginError, match="affine last layer"):
        _fitted(cls, FitContext(train, train, 3, 0, torch.device("cpu"), NotAffine(np.eye(3), np.zeros(3))))
    with pytest.raises(PluginError, match="head"):
        _fitted(cls, FitContext(train, train, 3, 0, torch.device("cpu"), None))


def test_needs_are_declared_precisely():
    assert {cls.name: set(cls.needs) for cls in ALL} == {
        "knn": {"features"},
        "rmds": {"features", "labels"},
        "vim": {"features", "head"},
        "she": {"logits", "features", "labels"},
        "nnguide": {"logits", "features"},
        "fdbd": {"logits", "features", "head"},
        "nci": {"logits", "features", "head"},
    }


# -- the test kit ----------------------------------------------------------------------------

@pytest.mark.parametrize("cls, options", [
    (KNN, {}), (KNN, {"k": 1}), (RMDS, {}), (ViM, {}), (ViM, {"dim": 3}), (SHE, {}), (NNGuide, {}),
    (NNGuide, {"k": 1}), (FDBD, {}), (NCI, {}), (NCI, {"alpha": 0.0}),
])
def test_passes_the_test_kit(cls, options):
    assert check_detector(cls, options) == []


# -- pytorch-ood 0.4 -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pood(toy):
    """pytorch-ood's detectors fitted on the toy problem's features, with its head as an nn.Linear."""
    pytest.importorskip("pytorch_ood")
    train, queries, ctx, w, b = toy
    head = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(torch.tensor(w))
        head.bias.copy_(torch.tensor(b))
    return torch.tensor(train.features), torch.tensor(train.labels), torch.tensor(queries.features), head


def _pood_scores(detector, z):
    return detector.predict_features(z).double().numpy()


def test_knn_matches_pytorch_ood(toy, pood):
    from pytorch_ood.detector import KNN as PoodKNN
    _, queries, ctx, _, _ = toy
    z_train, y_train, z, _ = pood
    theirs = _pood_scores(PoodKNN(None, k=50).fit_features(z_train, y_train), z)
    np.testing.assert_allclose(_fitted(KNN, ctx).score(queries), -theirs, rtol=1e-5)


def test_rmds_matches_pytorch_ood_up_to_its_unnormalised_covariances(toy, pood):
    """pytorch-ood's RMD takes the scatter matrices (sums, not divided by N) plus 1e-6 I as covariances, so both
    of its distances are N times smaller: its outlier score is ours negated and divided by N (same ranking),
    but for that ridge. The score does not change when the features are scaled, so on features x 100 (in
    float64: pytorch-ood computes in torch's default dtype) the ridge vanishes and the scores agree closely."""
    from pytorch_ood.detector import RMD
    train, queries, ctx, _, _ = toy
    z_train, y_train, z, _ = pood
    ours = _fitted(RMDS, ctx).score(queries)
    theirs = _pood_scores(RMD(None).fit_features(z_train, y_train), z)
    np.testing.assert_array_equal(np.argsort(ours, kind="stable"), np.argsort(-theirs, kind="stable"))
    np.testing.assert_allclose(ours, -theirs * len(train), rtol=1e-3, atol=1e-5 * np.abs(ours).max())
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs = _pood_scores(RMD(None).fit_features(100 * z_train.double(), y_train), 100 * z.double())
    finally:
        torch.set_default_dtype(dtype)
    np.testing.assert_allclose(ours, -theirs * len(train), rtol=1e-6)


def test_vim_matches_pytorch_ood(toy, pood, monkeypatch):
    """pytorch-ood's ViM computes in float32 (``.float()``), which bounds the agreement to ~1e-4 where the
    principal space ends at a large eigenvalue gap (dim=4 here); run in float64 it is the same to rounding."""
    from pytorch_ood.detector import ViM as PoodViM
    _, queries, ctx, _, _ = toy
    z_train, y_train, z, head = pood
    for dim in (4, 6):
        ours = _fitted(ViM, ctx, dim=dim).score(queries)
        if dim == 4:
            theirs = _pood_scores(PoodViM(None, d=dim, w=head.weight, b=head.bias).fit_features(z_train, y_train), z)
            np.testing.assert_allclose(ours, -theirs, rtol=1e-4)
        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "float", torch.Tensor.double)
            detector = PoodViM(None, d=dim, w=head.weight.double(), b=head.bias.double())
            theirs = _pood_scores(detector.fit_features(z_train.double(), y_train), z.double())
        np.testing.assert_allclose(ours, -theirs, rtol=1e-9)


def test_she_matches_pytorch_ood(toy, pood):
    from pytorch_ood.detector import SHE as PoodSHE
    _, queries, ctx, _, _ = toy
    z_train, y_train, z, head = pood
    theirs = _pood_scores(PoodSHE(None, head).fit_features(z_train, y_train), z)
    np.testing.assert_allclose(_fitted(SHE, ctx).score(queries), -theirs, rtol=1e-5)


def test_nnguide_matches_pytorch_ood(toy, pood):
    from pytorch_ood.detector import NNGuide as PoodNNGuide
    _, queries, ctx, _, _ = toy
    z_train, y_train, z, head = pood
    theirs = _pood_scores(PoodNNGuide(None, head, k=10).fit_features(z_train, y_train), z)
    np.testing.assert_allclose(_fitted(NNGuide, ctx).score(queries), -theirs, rtol=1e-5)


def test_fdbd_matches_pytorch_ood(toy, pood):
    from pytorch_ood.detector import fDBD
    _, queries, ctx, _, _ = toy
    z_train, _, z, head = pood
    theirs = _pood_scores(fDBD(None, head).fit_features(z_train), z)
    np.testing.assert_allclose(_fitted(FDBD, ctx).score(queries), -theirs, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.01])
def test_nci_matches_pytorch_ood(toy, pood, alpha):
    """Same formula; pytorch-ood's default alpha is 0, the authors' (and ours) 1e-4."""
    from pytorch_ood.detector import NCI as PoodNCI
    _, queries, ctx, _, _ = toy
    z_train, _, z, head = pood
    theirs = _pood_scores(PoodNCI(None, head, alpha=alpha).fit_features(z_train), z)
    np.testing.assert_allclose(_fitted(NCI, ctx, alpha=alpha).score(queries), -theirs, rtol=1e-5)
