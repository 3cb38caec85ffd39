"""Generative Ensembles (WAIC): hand-computed mean - population variance, seeds, real members."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from oodbench.api import Detector, FitContext, ImageSet, PluginError, SplitView
from oodbench_plugins.detectors import waic as waic_module
from oodbench_plugins.detectors.waic import GenerativeEnsemble


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny convolutions gain nothing from a second thread, and on shared cores two OpenMP
    # threads per process make them an order of magnitude slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class StandIn(Detector):
    """Fake density model: log p_m(x) = scale * (1 + spread * (seed % 1000)) * features[:, 0]."""

    name = "standin"
    needs = frozenset({"logits", "features"})

    def __init__(self, *, scale: float = 1.0, spread: float = 1.0, seed: int = 0):
        self.scale, self.spread, self.seed = scale, spread, seed
        self.ctx_seed: int | None = None

    def fit(self, ctx: FitContext) -> None:
        self.ctx_seed = ctx.seed

    def score(self, view: SplitView) -> np.ndarray:
        return self.scale * (1 + self.spread * (self.seed % 1000)) * view.features[:, 0].astype(np.float64)

    def metadata(self) -> dict[str, Any]:
        return {"seed": self.seed, "ctx_seed": self.ctx_seed}


class NeedsLabels(StandIn):
    needs = frozenset({"logits", "labels"})


@pytest.fixture(autouse=True)
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(waic_module.MEMBERS, "standin", (__name__, "StandIn"))
    monkeypatch.setitem(waic_module.MEMBERS, "needs_labels", (__name__, "NeedsLabels"))


def view(name: str, features: np.ndarray, images: np.ndarray | None = None) -> SplitView:
    n = len(features)
    if images is None:
        images = np.zeros((n, 1, 4, 4), np.uint8)
    return SplitView(name, np.zeros((n, 3), np.float32), features.astype(np.float32), ImageSet(images))


def context(train: SplitView, val: SplitView, seed: int = 0) -> FitContext:
    return FitContext(train, val, 3, seed, torch.device("cpu"))


def fitted(features: np.ndarray, **options: Any) -> GenerativeEnsemble:
    det = GenerativeEnsemble(**options)
    det.fit(context(view("train", features), view("val", features)))
    return det


def test_identical_members_give_the_mean_log_likelihood() -> None:
    f = np.array([[1.5], [-2.0], [0.25]])
    det = fitted(f, member="standin", M=4, member_options={"spread": 0.0, "scale": 3.0})
    np.testing.assert_array_equal(det.score(view("x", f)), 3.0 * f[:, 0])


def test_disagreeing_members_lose_exactly_the_population_variance() -> None:
    # members m = 0, 1, 2 give l_m = (m + 1) f: for f = 1 -> (1, 2, 3), mean 2, variance 2/3
    f = np.array([[1.0], [2.0], [-3.0]])
    det = fitted(f, member="standin", M=3)
    lls = det.member_log_likelihoods(view("x", f))
    np.testing.assert_array_equal(lls, [[1, 2, -3], [2, 4, -6], [3, 6, -9]])
    # mean 2, var 2/3 -> 4/3; mean 4, var 8/3 -> 4/3; mean -6, var 6 -> -12
    np.testing.assert_allclose(det.score(view("x", f)), [4 / 3, 4 / 3, -12.0], rtol=1e-12)


def test_member_seeds_differ_and_reach_both_constructor_and_fit_context() -> None:
    det = fitted(np.ones((2, 1)), member="standin", M=3, seed=2)
    assert det.metadata()["member_seeds"] == [2000, 2001, 2002]
    assert [m["seed"] for m in det.metadata()["members"]] == [2000, 2001, 2002]
    assert [m["ctx_seed"] for m in det.metadata()["members"]] == [2000, 2001, 2002]
    other = GenerativeEnsemble(member="standin", M=3, seed=3)
    assert not set(det.seeds) & set(other.seeds)


def test_bad_options_and_undeclared_member_needs_are_refused() -> None:
    for options in ({"member": "glow"}, {"M": 1}, {"member_options": {"seed": 4}}):
        with pytest.raises(PluginError):
            GenerativeEnsemble(**options)
    with pytest.raises(PluginError, match="labels"):
        fitted(np.ones((2, 1)), member="needs_labels")


def blob_features(n: int, seed: int) -> np.ndarray:
    # no cluster structure, so mixtures started from different seeds settle in different optima
    return np.random.default_rng(seed).random((n, 6))


def test_gmm_members_known_answer_and_determinism() -> None:
    from oodbench_plugins.detectors.gmm import FeatureGMM

    train, test = view("train", blob_features(300, 0)), view("test", blob_features(50, 1))
    options = dict(member="gmm", M=3, member_options={"k": 8, "max_iter": 20}, seed=1)
    det = GenerativeEnsemble(**options)
    det.fit(context(train, train))
    lls = []
    for m in range(3):
        member = FeatureGMM(k=8, max_iter=20, seed=1000 + m)
        member.fit(context(train, train, seed=1000 + m))
        lls.append(member.score(test))
    lls = np.array(lls)
    np.testing.assert_allclose(det.score(test), lls.mean(0) - lls.var(0), rtol=1e-12)
    assert lls.var(0).min() > 1e-4  # the seeds really gave different mixtures

    again = GenerativeEnsemble(**options)
    again.fit(context(train, train))
    np.testing.assert_array_equal(again.score(test), det.score(test))
    other = GenerativeEnsemble(**{**options, "seed": 2})
    other.fit(context(train, train))
    assert not np.allclose(other.score(test), det.score(test))


def test_pixelcnn_members_on_pixels() -> None:
    from oodbench_plugins.detectors.pixelcnn import PixelCNNPP

    rng = np.random.default_rng(0)
    images = (rng.random((60, 1, 4, 4)) < np.linspace(0.1, 0.9, 16).reshape(1, 1, 4, 4)).astype(np.uint8) * 255
    train = view("train", np.zeros((60, 1)), images)
    tiny = {"nr_resnet": 1, "nr_filters": 4, "nr_logistic_mix": 2, "epochs": 1, "batch_size": 20}
    det = GenerativeEnsemble(member="pixelcnn", M=2, member_options=tiny)
    det.fit(context(train, train))
    lls = []
    for m in range(2):
        member = PixelCNNPP(**tiny, seed=m)
        member.fit(context(train, train, seed=m))
        lls.append(member.score(train))
    lls = np.array(lls)
    scores = det.score(train)
    np.testing.assert_allclose(scores, lls.mean(0) - lls.var(0), rtol=1e-12)
    assert np.isfinite(scores).all() and (scores < lls.mean(0)).all()


def test_vae_members_score_with_the_16_sample_iwae_bound() -> None:
    """Issue 20 item 9: the paper scores its VAE members by the IWAE bound with 16 samples (Burda et al. 2016:
    L_k = log (1/k) sum_k p(x, z_k) / q(z_k | x)), not the ELBO; member_options can still ask for the ELBO."""
    features = blob_features(60, 0)
    small = {"epochs": 2, "hidden": 8, "latent": 2}
    det = fitted(features, member="vae", M=2, member_options=small)
    assert [m.metadata()["bound"] for m in det.members] == ["iwae_16", "iwae_16"]
    # The bound re-computed from a member's network: logsumexp of 16 log-weights minus log 16
    member, x = det.members[0], view("x", features[:5])
    net = member.net
    standardised = torch.from_numpy(member.standardiser(x.features)).to(next(net.parameters()).dtype)
    generator = torch.Generator().manual_seed(member.seed + 2)  # the stream FeatureVAE.score draws from
    with torch.no_grad():
        log_w = net.log_weights(standardised, 16, generator)
    expected = (torch.logsumexp(log_w, 0) - np.log(16)).numpy() - member.standardiser.log_scale
    np.testing.assert_allclose(member.score(x), expected, rtol=1e-10)
    elbo = fitted(features, member="vae", M=2, member_options={**small, "iwae_samples": 0})
    assert [m.metadata()["bound"] for m in elbo.members] == ["elbo_8", "elbo_8"]
