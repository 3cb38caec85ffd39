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
_IN_DISTRIBUTION = {"dataset", "options", "labels_per_class"}
_MODEL = {"plugin", "options"}
_SOURCES = {"mistakes", "ood", "attack_subset", "attacks"}
_OOD_TABLE = {"dataset", "name", "options"}
_ATTACK = {"plugin", "eps", "options"}
_RUN = {"seeds": 1, "batch_size": 256, "holdout_size": 1000, "holdout_fraction": 0.2, "test_subset": 0,
        "precision": "float32"}
PRECISIONS = ("float32", "float64")


def _read(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The file's bytes (hashed into every row) and its TOML; BenchmarkError for anything unreadable."""
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise BenchmarkError(f"benchmark file not found: {path}") from None
    except IsADirectoryError:
        raise BenchmarkError(f"{path}: a folder, not a benchmark file (give the .toml file in it)") from None
    except OSError as exc:
        raise BenchmarkError(f"{path}: cannot read the benchmark file: {exc.strerror or exc}") from None
    try:
        return raw_bytes, tomllib.loads(raw_bytes.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise BenchmarkError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


def load_benchmark(path: Path) -> Benchmark:
    """Read and check a benchmark file; every mistake in it is a BenchmarkError naming the key.

    Unknown keys are refused rather than ignored: a typo such as ``oods = [...]`` would otherwise
    silently drop what it meant to define. Whether the named plugins exist is checked by the
    caller, which holds the registry.
    """
    path = Path(path)
    raw_bytes, raw = _read(path)

    def fail(where: str, message: str) -> BenchmarkError:
        return BenchmarkError(f"{path}: {where}: {message}")

    def known(value: dict, where: str, allowed: set[str]) -> dict:
        unknown = sorted(set(value) - allowed)
        if unknown:
            keys = ", ".join(f"{where}.{k}" if where else k for k in unknown)
            raise fail(keys, f"unknown key {', '.join(unknown)} in {where or 'the top level'}; "
                             f"allowed: {', '.join(sorted(allowed))}")
        return value

    def table(value: Any, where: str, allowed: set[str] | None = None) -> dict:
        if not isinstance(value, dict):
            raise fail(where, "must be a table")
        return value if allowed is None else known(value, where, allowed)

    def array(value: Any, where: str) -> list:
        if not isinstance(value, list):
            raise fail(where, f"must be a list, got {type(value).__name__} {value!r}")
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

    def flag(value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise fail(where, "must be true or false")
        return value

    known(raw, "", _TOP)
    name = text(raw.get("name"), "name")
    # The name is a folder under ./oodbench-results and what --benchmark takes: one plain path component.
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise fail("name", f"must be a plain name (no '/', '\\', NUL, not '.' or '..'), got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "must be a string")
    idd = table(raw.get("in_distribution"), "in_distribution", _IN_DISTRIBUTION)
    model = table(raw.get("model"), "model", _MODEL)
    sources = table(raw.get("sources", {}), "sources", _SOURCES)
    run = {**_RUN, **table(raw.get("run", {}), "run", set(_RUN))}

    ood = []
    for i, item in enumerate(array(sources.get("ood", []), "sources.ood")):
        where = f"sources.ood[{i}]"
        if isinstance(item, str):
            ood.append(OODRef(text(item, where), item))
        else:
            item = table(item, where, _OOD_TABLE)
            dataset = text(item.get("dataset"), f"{where}.dataset")
            ood.append(OODRef(text(item.get("name", dataset), f"{where}.name"), dataset, options(item.get("options"), f"{where}.options")))
    names = [o.name for o in ood]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise fail("sources.ood", f"duplicate source names {duplicates}: give each a distinct 'name'")

    attacks = []
    for i, item in enumerate(array(sources.get("attacks", []), "sources.attacks")):
        where = f"sources.attacks[{i}]"
        item = table(item, where, _ATTACK)
        eps = item.get("eps")
        if not isinstance(eps, list) or not eps or not all(isinstance(e, (int, float)) and not isinstance(e, bool) and 0 < e <= 1 for e in eps):
            raise fail(f"{where}.eps", "must be a non-empty list of numbers in (0, 1] (pixel units)")
        attacks.append(AttackRef(text(item.get("plugin"), f"{where}.plugin"), tuple(float(e) for e in eps), options(item.get("options"), f"{where}.options")))

    fraction = run["holdout_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise fail("run.holdout_fraction", "must be a number in [0, 1)")
    if not isinstance(run["precision"], str) or run["precision"] not in PRECISIONS:
        raise fail("run.precision", f"must be one of {', '.join(PRECISIONS)}, got {run['precision']!r}")

    return Benchmark(
        name=name,
        description=description,
        path=path,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        in_distribution=PluginRef(text(idd.get("dataset"), "in_distribution.dataset"), options(idd.get("options"), "in_distribution.options")),
        model=PluginRef(text(model.get("plugin"), "model.plugin"), options(model.get("options"), "model.options")),
        mistakes=flag(sources.get("mistakes", True), "sources.mistakes"),
        ood=tuple(ood),
        attacks=tuple(attacks),
        attack_subset=integer(sources.get("attack_subset", 0), "sources.attack_subset", 0),
        seeds=integer(run["seeds"], "run.seeds", 1),
        batch_size=integer(run["batch_size"], "run.batch_size", 1),
        holdout_size=integer(run["holdout_size"], "run.holdout_size", 0),
        holdout_fraction=float(fraction),
        test_subset=integer(run["test_subset"], "run.test_subset", 0),
        default=flag(raw.get("default", False), "default"),
        labels_per_class=integer(idd.get("labels_per_class", 0), "in_distribution.labels_per_class", 0),
        precision=run["precision"],
    )
