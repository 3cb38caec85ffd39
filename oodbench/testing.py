"""A test kit for detector plugins: run a class through the contract in about a second on CPU.

In a plugin's tests::

    from oodbench.testing import assert_detector_contract

    def test_contract():
        assert_detector_contract(MyDetector)

``check_detector`` returns the list of violations instead of raising. A class that stores its
fitted state (``Detector.stores_state``) is also checked for a round trip: its ``state_dict``
after fit, written with ``np.savez`` and read back without pickle, loaded into a fresh
instance, must give the fitted detector's scores and metadata exactly. The kit builds its own
tiny problem (no dataset or model plugin needed): 4x4 one-channel images, a fixed classifier
whose penultimate features are the pixels x and whose logits come from a linear head,
16 x.p_c - 8 |p_c|^2 for four class prototypes p_c: minus 8 times the squared distance to each
prototype, up to a per-input shift (8 |x|^2) that changes neither the softmax nor the
prediction. Detectors that need ``"head"`` or ``"gradients"`` get its ``ClassifierHandle``
as the core gives it (``ctx.model``); intermediate layers, for detectors that need
``"layers"``, are the pixels and the four row means. Positives are inputs near a prototype; negatives are midpoints
between two prototypes, ambiguous for the classifier and off the data for a density, so any
sensible detector ranks positives higher.
"""
from __future__ import annotations

import inspect
import io
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .api import NEEDS, Detector, FitContext, Holdout, ImageSet, SplitView
from .classifier import ClassifierHandle
from .detector_state import from_arrays, to_arrays
from .metrics import auroc


class _PrototypeNet(torch.nn.Module):
    def __init__(self, prototypes: torch.Tensor):
        super().__init__()
        # -8 |x - p_c|^2 = 16 x.p_c - 8 |p_c|^2 - 8 |x|^2; the last term is the same for every class
        self.head = torch.nn.Linear(prototypes.shape[1], len(prototypes))
        with torch.no_grad():
            self.head.weight.copy_(16.0 * prototypes)
            self.head.bias.copy_(-8.0 * prototypes.pow(2).sum(1))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.flatten(1)
        return self.head(flat), flat

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


@dataclass
class _ToyRun:
    """One fit (or load) of a detector on the toy problem, its tuning and its scores."""

    detector: Detector
    pos: np.ndarray
    neg: np.ndarray
    choice: Any = None  # what tune() returned, for a class that tunes on sources
    stored: dict[str, np.ndarray] | None = None  # state_dict() right after fit, as the core stores it
    state_error: str = ""  # why state_dict() could not be stored


def _toy_run(cls: type, options: dict[str, Any], seed: int, state: dict[str, Any] | None = None,
             store: bool = False) -> _ToyRun:
    """Fit ``cls`` on the toy problem (or, given a stored ``state``, load it instead), tune if it tunes, score.

    With ``store``, the state is taken as the core takes it: right after ``fit``, before tuning.
    """
    toy = ToyProblem(seed)
    needs = frozenset(cls.needs) | {"logits"}
    scoring = needs - {"labels"}
    detector = cls(**options)
    train = toy.view("train", toy.train, toy.train_y, needs)
    val = toy.view("val", toy.val, toy.val_y, needs)
    ctx = FitContext(train.restricted(needs), val.restricted(needs), toy.classes, seed,
                     torch.device("cpu"), toy.handle if needs & {"gradients", "head"} else None)
    stored, state_error = None, ""
    if state is None:
        detector.fit(ctx)
        if store:
            try:
                stored = to_arrays(detector.state_dict(), repr(cls.name))
            except Exception as exc:
                state_error = f"state_dict() after fit raised {type(exc).__name__}: {exc}"
    else:
        detector.load_state_dict(state, ctx)
    pos = toy.view("positives", toy.pos, None, scoring)
    neg = toy.view("negatives", toy.neg, None, scoring)
    choice = None
    if cls.tunes_on_source:
        half = len(toy.pos) // 2
        idx_h, idx_e = np.arange(half), np.arange(half, len(toy.pos))
        choice = detector.tune(Holdout("toy", pos.subset(idx_h), neg.subset(idx_h)))
        pos, neg = pos.subset(idx_e), neg.subset(idx_e)
    return _ToyRun(detector, np.asarray(detector.score(pos)), np.asarray(detector.score(neg)), choice,
                   stored, state_error)


def _with_seed(cls: type, options: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    options = dict(options or {})
    if "seed" in inspect.signature(cls.__init__).parameters:
        options.setdefault("seed", seed)
    return options


def check_detector(cls: type, options: dict[str, Any] | None = None, seed: int = 0) -> list[str]:
    """Every contract violation of detector class ``cls`` on the toy problem, as sentences."""
    problems: list[str] = []
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
    if not cls.stores_state() and (cls.state_dict is not Detector.state_dict
                                   or cls.load_state_dict is not Detector.load_state_dict):
        problems.append("implements only one of state_dict and load_state_dict: a state is stored only with both")
    options = _with_seed(cls, options, seed)

    try:
        first = _toy_run(cls, options, seed, store=cls.stores_state())
    except Exception as exc:  # the kit reports, it does not stop at the first problem
        problems.append(f"fit/score raised {type(exc).__name__}: {exc}")
        return problems
    if cls.tunes_on_source and not isinstance(first.choice, dict):
        problems.append(f"tune() must return a dict of the chosen hyperparameters, got {type(first.choice).__name__}")
    n = 32 if cls.tunes_on_source else 64
    for side, values in (("positives", first.pos), ("negatives", first.neg)):
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
    separation = auroc(first.pos, first.neg)
    if separation < 0.5:
        problems.append(f"scores look inverted: AUROC {separation:.3f} < 0.5 on the obvious case "
                        "(higher must mean more trustworthy)")
    try:
        json.dumps(first.detector.metadata())
    except Exception as exc:
        problems.append(f"metadata() is not JSON-serialisable: {exc}")
    try:
        second = _toy_run(cls, options, seed)
        if not (np.array_equal(first.pos, second.pos) and np.array_equal(first.neg, second.neg)):
            problems.append("not deterministic: two fits with the same seed gave different scores")
    except Exception as exc:
        problems.append(f"second fit raised {type(exc).__name__}: {exc}")
    if cls.stores_state():
        problems += _round_trip_problems(cls, options, seed, first)
    return problems


def check_state_round_trip(cls: type, options: dict[str, Any] | None = None, seed: int = 0) -> list[str]:
    """The problems of storing ``cls``'s fit: one fit, the state stored as the core stores it, one load.

    The part of ``check_detector`` about ``state_dict``/``load_state_dict`` alone, for a quick
    test with options too small for the rest of the contract (few epochs, tiny networks).
    """
    if not cls.stores_state():
        return [f"{cls.__name__} does not implement both state_dict and load_state_dict"]
    options = _with_seed(cls, options, seed)
    try:
        first = _toy_run(cls, options, seed, store=True)
    except Exception as exc:
        return [f"fit/score raised {type(exc).__name__}: {exc}"]
    return _round_trip_problems(cls, options, seed, first)


def _round_trip_problems(cls: type, options: dict[str, Any], seed: int, fitted: _ToyRun) -> list[str]:
    """Store the fit's state as the cache does (``np.savez``, read back without pickle), load it into a fresh
    instance with the same options, and compare tuning, scores and metadata with the fitted detector's."""
    if fitted.stored is None:
        return [fitted.state_error]
    buffer = io.BytesIO()
    np.savez(buffer, **fitted.stored)
    buffer.seek(0)
    try:
        with np.load(buffer, allow_pickle=False) as data:
            state = from_arrays({name: data[name] for name in data.files})
        loaded = _toy_run(cls, options, seed, state=state)
    except Exception as exc:
        return [f"state round trip (state_dict, np.savez, np.load without pickle, load_state_dict) raised "
                f"{type(exc).__name__}: {exc}"]
    problems = []
    if not (np.array_equal(fitted.pos, loaded.pos) and np.array_equal(fitted.neg, loaded.neg)):
        problems.append("load_state_dict does not restore the fit: scores after a state round trip differ from "
                        "the fitted detector's")
    try:
        for what, after_fit, after_load in (("tune()", fitted.choice, loaded.choice),
                                            ("metadata()", fitted.detector.metadata(), loaded.detector.metadata())):
            if json.dumps(after_fit, sort_keys=True, default=repr) != json.dumps(after_load, sort_keys=True, default=repr):
                problems.append(f"{what} after load_state_dict differs from {what} after fit")
    except Exception as exc:
        problems.append(f"metadata() after load_state_dict raised {type(exc).__name__}: {exc}")
    return problems


def assert_detector_contract(cls: type, options: dict[str, Any] | None = None, seed: int = 0) -> None:
    """Raise ``AssertionError`` listing every contract violation of ``cls`` (see ``check_detector``)."""
    problems = check_detector(cls, options, seed)
    if problems:
        raise AssertionError(f"{getattr(cls, 'name', cls)} breaks the detector contract:\n- " + "\n- ".join(problems))
