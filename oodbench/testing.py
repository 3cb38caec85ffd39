"""A test kit for detector plugins: run a class through the contract in about a second on CPU.

In a plugin's tests::

    from oodbench.testing import assert_detector_contract

    def test_contract():
        assert_detector_contract(MyDetector)

``check_detector`` returns the list of violations instead of raising. The kit builds its own
tiny problem (no dataset or model plugin needed): 4x4 one-channel images, a fixed classifier
whose logits are minus squared distances to four class prototypes and whose penultimate
features are the pixels (intermediate layers, for detectors that need ``"layers"``: the
pixels and the four row means). Positives are inputs near a prototype; negatives are midpoints
between two prototypes, ambiguous for the classifier and off the data for a density, so any
sensible detector ranks positives higher.
"""
from __future__ import annotations

import inspect
import json
from typing import Any

import numpy as np
import torch

from .api import NEEDS, ClassifierHandle, Detector, FitContext, Holdout, ImageSet, SplitView
from .metrics import auroc


class _PrototypeNet(torch.nn.Module):
    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        self.register_buffer("prototypes", prototypes)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(1)
        return -torch.cdist(flat, self.prototypes).pow(2) * 8.0, flat

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        logits, flat = self.forward_features(x)
        return logits, flat, [flat, x.mean(-1).flatten(1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


class ToyProblem:
    """The kit's data and classifier; ``views()`` gives (train, val, positives, negatives)."""

    classes = 4

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.prototypes = np.full((self.classes, 16), 0.2, np.float32)
        for c in range(self.classes):
            self.prototypes[c, 4 * c:4 * c + 4] = 0.8  # class c lights up row c
        self.network = _PrototypeNet(torch.from_numpy(self.prototypes))
        self.handle = ClassifierHandle(self.network, torch.device("cpu"), batch_size=64)

        def near(n: int) -> tuple[np.ndarray, np.ndarray]:
            labels = rng.integers(0, self.classes, n)
            x = self.prototypes[labels] + rng.normal(0, 0.05, (n, 16))
            return x.clip(0, 1).astype(np.float32).reshape(n, 1, 4, 4), labels

        self.train, self.train_y = near(256)
        self.val, self.val_y = near(64)
        self.pos, _ = near(64)
        pairs = rng.choice(self.classes, (64, 2), replace=True)
        pairs[:, 1] = (pairs[:, 0] + 1 + rng.integers(0, self.classes - 1, 64)) % self.classes
        mid = 0.5 * (self.prototypes[pairs[:, 0]] + self.prototypes[pairs[:, 1]]) + rng.normal(0, 0.05, (64, 16))
        self.neg = mid.clip(0, 1).astype(np.float32).reshape(64, 1, 4, 4)

    def view(self, name: str, x: np.ndarray, labels: np.ndarray | None, allowed: frozenset[str]) -> SplitView:
        logits, feats, layers = self.handle.outputs_and_layers(torch.from_numpy(x), "layers" in allowed)
        return SplitView(name, logits.numpy(), feats.numpy(), ImageSet(x, labels, name, self.classes),
                         labels, allowed, key=name, layers=[layer.numpy() for layer in layers] or None)


def check_detector(cls: type, options: dict[str, Any] | None = None, seed: int = 0) -> list[str]:
    """Every contract violation of detector class ``cls`` on the toy problem, as sentences."""
    problems: list[str] = []
    options = dict(options or {})
    if not (isinstance(cls, type) and issubclass(cls, Detector)):
        return [f"{cls!r} is not a subclass of oodbench.api.Detector"]
    if not cls.name:
        problems.append("class attribute 'name' is empty")
    if not (inspect.getdoc(cls) or "").strip() or inspect.getdoc(cls) == inspect.getdoc(Detector):
        problems.append("no class docstring (its first line is what `oodbench list` shows)")
    if not isinstance(cls.version, str):
        problems.append("'version' must be a string")
    unknown = set(cls.needs) - NEEDS
    if unknown:
        problems.append(f"needs has unknown entries {sorted(unknown)}; allowed: {sorted(NEEDS)}")
    if "seed" in inspect.signature(cls.__init__).parameters:
        options.setdefault("seed", seed)

    def fit_and_score() -> tuple[Detector, np.ndarray, np.ndarray]:
        toy = ToyProblem(seed)
        needs = frozenset(cls.needs) | {"logits"}
        scoring = needs - {"labels"}
        detector = cls(**options)
        train = toy.view("train", toy.train, toy.train_y, needs)
        val = toy.view("val", toy.val, toy.val_y, needs)
        detector.fit(FitContext(train.restricted(needs), val.restricted(needs), toy.classes, seed,
                                torch.device("cpu"), toy.handle if "gradients" in needs else None))
        pos = toy.view("positives", toy.pos, None, scoring)
        neg = toy.view("negatives", toy.neg, None, scoring)
        if cls.tunes_on_source:
            half = len(toy.pos) // 2
            idx_h, idx_e = np.arange(half), np.arange(half, len(toy.pos))
            choice = detector.tune(Holdout("toy", pos.subset(idx_h), neg.subset(idx_h)))
            if not isinstance(choice, dict):
                problems.append(f"tune() must return a dict of the chosen hyperparameters, got {type(choice).__name__}")
            pos, neg = pos.subset(idx_e), neg.subset(idx_e)
        return detector, np.asarray(detector.score(pos)), np.asarray(detector.score(neg))

    try:
        detector, pos, neg = fit_and_score()
    except Exception as exc:  # the kit reports, it does not stop at the first problem
        problems.append(f"fit/score raised {type(exc).__name__}: {exc}")
        return problems
    for side, values, n in (("positives", pos, 32 if cls.tunes_on_source else 64), ("negatives", neg, 32 if cls.tunes_on_source else 64)):
        if values.shape != (n,):
            problems.append(f"score() on {n} {side} returned shape {values.shape}, expected ({n},)")
            return problems
        if not np.issubdtype(values.dtype, np.number):
            problems.append(f"score() returned dtype {values.dtype}, expected floats")
            return problems
        bad = int((~np.isfinite(values.astype(np.float64))).sum())
        if bad:
            problems.append(f"score() returned {bad} non-finite values on {side}")
            return problems
    separation = auroc(pos, neg)
    if separation < 0.5:
        problems.append(f"scores look inverted: AUROC {separation:.3f} < 0.5 on the obvious case "
                        "(higher must mean more trustworthy)")
    try:
        json.dumps(detector.metadata())
    except Exception as exc:
        problems.append(f"metadata() is not JSON-serialisable: {exc}")
    try:
        _, pos2, neg2 = fit_and_score()
        if not (np.array_equal(pos, pos2) and np.array_equal(neg, neg2)):
            problems.append("not deterministic: two fits with the same seed gave different scores")
    except Exception as exc:
        problems.append(f"second fit raised {type(exc).__name__}: {exc}")
    return problems


def assert_detector_contract(cls: type, options: dict[str, Any] | None = None, seed: int = 0) -> None:
    """Raise ``AssertionError`` listing every contract violation of ``cls`` (see ``check_detector``)."""
    problems = check_detector(cls, options, seed)
    if problems:
        raise AssertionError(f"{getattr(cls, 'name', cls)} breaks the detector contract:\n- " + "\n- ".join(problems))
