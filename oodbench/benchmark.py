"""Benchmark definitions: a TOML file naming the data, the classifier and the failure sources.

Schema (version 1; every key but ``name``, ``in_distribution`` and ``model`` is optional)::

    name = "digits"                 # what --benchmark takes
    description = "one line"
    default = true                  # the benchmark `oodbench run` uses when none is named

    [in_distribution]
    dataset = "digits"              # a dataset plugin providing train/val/test with labels
    options = {}                    # its options
    labels_per_class = 0            # semi-supervised: keep this many training labels per class
                                    # (seeded choice; 0 = keep every label)

    [model]
    plugin = "digits-cnn"           # a model plugin
    options = {}

    [sources]
    mistakes = true                 # misclassified test inputs
    ood = ["gaussian", {dataset = "npz", name = "mnist", options = {path = "mnist.npz"}}]
    attack_subset = 0               # attack the first N evaluated test images (0 = all)

    [[sources.attacks]]
    plugin = "fgsm"
    eps = [0.05, 0.1]               # pixel units in [0, 1]
    options = {}

    [run]
    seeds = 1                       # default for --seeds
    batch_size = 256
    holdout_size = 1000             # per class of a source, for detectors tuned on the source
    holdout_fraction = 0.2          # ...but never more than this fraction of it
    test_subset = 0                 # evaluate on the first N test images (0 = all)
    precision = "float32"           # of the shared classifier passes (extraction, attacks): "float64"
                                    # makes them the same on every CPU, ~5x slower there
"""
from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class BenchmarkError(ValueError):
    """A benchmark file is malformed; the message names the file and the field."""


@dataclass(frozen=True)
class PluginRef:
    plugin: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OODRef:
    name: str  # the source is called ood:<name>
    dataset: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AttackRef:
    plugin: str
    eps: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    path: Path
    sha256: str
    in_distribution: PluginRef
    model: PluginRef
    mistakes: bool
    ood: tuple[OODRef, ...]
    attacks: tuple[AttackRef, ...]
    attack_subset: int
    seeds: int
    batch_size: int
    holdout_size: int
    holdout_fraction: float
    test_subset: int
    default: bool = False
    labels_per_class: int = 0
    precision: str = "float32"


_TOP = {"name", "description", "default", "in_distribution", "model", "sources", "run"}
_RUN = {"seeds": 1, "batch_size": 256, "holdout_size": 1000, "holdout_fraction": 0.2, "test_subset": 0,
        "precision": "float32"}
PRECISIONS = ("float32", "float64")


def load_benchmark(path: Path) -> Benchmark:
    path = Path(path)
    try:
        raw_bytes = path.read_bytes()
        raw = tomllib.loads(raw_bytes.decode("utf-8"))
    except FileNotFoundError:
        raise BenchmarkError(f"benchmark file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: not valid TOML: {exc}") from None

    def fail(where: str, message: str) -> BenchmarkError:
        return BenchmarkError(f"{path}: {where}: {message}")

    unknown = set(raw) - _TOP
    if unknown:
        raise fail(", ".join(sorted(unknown)), f"unknown key; allowed: {', '.join(sorted(_TOP))}")

    def table(value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            raise fail(where, "must be a table")
        return value

    def text(value: Any, where: str) -> str:
        if not isinstance(value, str) or not value:
            raise fail(where, "must be a non-empty string")
        return value

    def options(value: Any, where: str) -> dict:
        return dict(table(value if value is not None else {}, where))

    def integer(value: Any, where: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise fail(where, f"must be an integer >= {minimum}")
        return value

    name = text(raw.get("name"), "name")
    idd = table(raw.get("in_distribution"), "in_distribution")
    unknown_idd = set(idd) - {"dataset", "options", "labels_per_class"}
    if unknown_idd:
        raise fail("in_distribution", f"unknown key {', '.join(sorted(unknown_idd))}; "
                                      "allowed: dataset, options, labels_per_class")
    model = table(raw.get("model"), "model")
    sources = table(raw.get("sources", {}), "sources")
    run = table(raw.get("run", {}), "run")
    unknown_run = set(run) - set(_RUN)
    if unknown_run:
        raise fail("run", f"unknown key {', '.join(sorted(unknown_run))}; allowed: {', '.join(_RUN)}")
    run = {**_RUN, **run}

    ood = []
    for i, item in enumerate(sources.get("ood", [])):
        where = f"sources.ood[{i}]"
        if isinstance(item, str):
            ood.append(OODRef(item, item))
        else:
            item = table(item, where)
            dataset = text(item.get("dataset"), f"{where}.dataset")
            ood.append(OODRef(text(item.get("name", dataset), f"{where}.name"), dataset, options(item.get("options"), f"{where}.options")))
    names = [o.name for o in ood]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise fail("sources.ood", f"duplicate source names {duplicates}: give each a distinct 'name'")

    attacks = []
    for i, item in enumerate(sources.get("attacks", [])):
        where = f"sources.attacks[{i}]"
        item = table(item, where)
        eps = item.get("eps")
        if not isinstance(eps, list) or not eps or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in eps):
            raise fail(f"{where}.eps", "must be a non-empty list of numbers in (0, 1] (pixel units)")
        attacks.append(AttackRef(text(item.get("plugin"), f"{where}.plugin"), tuple(float(e) for e in eps), options(item.get("options"), f"{where}.options")))

    fraction = run["holdout_fraction"]
    if not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise fail("run.holdout_fraction", "must be a number in [0, 1)")
    if run["precision"] not in PRECISIONS:
        raise fail("run.precision", f"must be one of {', '.join(PRECISIONS)}, got {run['precision']!r}")
    mistakes = sources.get("mistakes", True)
    if not isinstance(mistakes, bool):
        raise fail("sources.mistakes", "must be true or false")
    default = raw.get("default", False)
    if not isinstance(default, bool):
        raise fail("default", "must be true or false")

    return Benchmark(
        name=name,
        description=str(raw.get("description", "")),
        path=path,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        in_distribution=PluginRef(text(idd.get("dataset"), "in_distribution.dataset"), options(idd.get("options"), "in_distribution.options")),
        model=PluginRef(text(model.get("plugin"), "model.plugin"), options(model.get("options"), "model.options")),
        mistakes=mistakes,
        ood=tuple(ood),
        attacks=tuple(attacks),
        attack_subset=integer(sources.get("attack_subset", 0), "sources.attack_subset", 0),
        seeds=integer(run["seeds"], "run.seeds", 1),
        batch_size=integer(run["batch_size"], "run.batch_size", 1),
        holdout_size=integer(run["holdout_size"], "run.holdout_size", 0),
        holdout_fraction=float(fraction),
        test_subset=integer(run["test_subset"], "run.test_subset", 0),
        default=default,
        labels_per_class=integer(idd.get("labels_per_class", 0), "in_distribution.labels_per_class", 0),
        precision=run["precision"],
    )
