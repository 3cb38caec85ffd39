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

    [[sources.covariate-shift]]     # any other key names a failure-source plugin:
    corruption = "contrast"         # each table is one instance, with these options
    severity = 3

``mistakes``, ``ood`` and ``attacks`` are shorthands for the built-in source plugins of those
names (``Benchmark.sources`` lists every instance in row order: those three first).

    [detectors.pixelcnn]            # this benchmark's options for a detector, under what the
    config = "paper"                # command line gives (pixelcnn[epochs=5] keeps config = "paper")

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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .plugins import expected


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
    #: the ``[[sources.<plugin>]]`` tables of other source plugins, in file order
    extra_sources: tuple[PluginRef, ...] = ()
    #: ``[detectors.<name>]``: the benchmark's options for a detector, which the command line's override
    detector_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def sources(self) -> tuple[PluginRef, ...]:
        """Every failure-source plugin instance, in the order of the rows: the shorthand keys (the built-in
        ``mistakes``, ``ood`` and ``attacks`` plugins), then the other plugins' tables in file order."""
        return (*((PluginRef("mistakes"),) if self.mistakes else ()),
                *(PluginRef("ood", {"dataset": r.dataset, "label": r.name, "options": dict(r.options)})
                  for r in self.ood),
                *(PluginRef("attacks", {"attack": r.plugin, "eps": list(r.eps), "options": dict(r.options)})
                  for r in self.attacks),
                *self.extra_sources)


Precision = Literal["float32", "float64"]
PRECISIONS = typing.get_args(Precision)


# -- the schema, as pydantic models -------------------------------------------------------------
# TOML values are typed, so validation is strict (no "2" for an int, no 1 for true); an int is a fine
# float. Every table refuses unknown keys: a typo such as ``oods = [...]`` would otherwise silently drop
# what it meant to define. A field's words in errors come from its annotation (``plugins.expected``) or,
# where those would read badly, from its ``expected`` extra.
def _words(text: str) -> Any:
    return Field(json_schema_extra={"expected": text})


NonEmpty = Annotated[str, Field(min_length=1), _words("a non-empty string")]
Options = dict[str, Any]


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: what the table is, in words, when something else stands in its place
    expected: ClassVar[str] = "a table"


class _InDistribution(_Table):
    dataset: NonEmpty
    options: Options = {}
    labels_per_class: Annotated[int, Field(ge=0)] = 0


class _Model(_Table):
    plugin: NonEmpty
    options: Options = {}


class _OOD(_Table):
    expected: ClassVar[str] = "a dataset name or a table {dataset, name, options}"
    dataset: NonEmpty
    name: NonEmpty | None = None  # the source is called ood:<name>; the dataset's name by default
    options: Options = {}

    @model_validator(mode="before")
    @classmethod
    def _a_name_alone(cls, value: Any) -> Any:
        return {"dataset": value} if isinstance(value, str) else value


class _Attack(_Table):
    plugin: NonEmpty
    eps: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=1),
                   _words("a non-empty list of numbers in (0, 1] (pixel units)")]
    options: Options = {}


class _Sources(_Table):
    # Any other key names a failure-source plugin: a table, or a list of tables ([[sources.NAME]]), of its options.
    model_config = ConfigDict(extra="allow", strict=True)
    mistakes: bool = True
    ood: Annotated[list[_OOD], _words("a list of dataset names or tables {dataset, name, options}")] = []
    attack_subset: Annotated[int, Field(ge=0)] = 0
    attacks: Annotated[list[_Attack], _words("a list of tables {plugin, eps, options} ([[sources.attacks]])")] = []

    @field_validator("ood")
    @classmethod
    def _distinct_names(cls, ood: list[_OOD]) -> list[_OOD]:
        names = [item.name or item.dataset for item in ood]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate source names {duplicates}: give each a distinct 'name'")
        return ood


class _Run(_Table):
    seeds: Annotated[int, Field(ge=1)] = 1
    batch_size: Annotated[int, Field(ge=1)] = 256
    holdout_size: Annotated[int, Field(ge=0)] = 1000
    holdout_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2
    test_subset: Annotated[int, Field(ge=0)] = 0
    precision: Precision = "float32"


class _File(_Table):
    name: NonEmpty
    description: str = ""
    default: bool = False
    in_distribution: Annotated[_InDistribution, _words('a table naming its dataset ([in_distribution] dataset = "NAME")')]
    model: Annotated[_Model, _words('a table naming its model plugin ([model] plugin = "NAME")')]
    sources: _Sources = _Sources()
    detectors: Annotated[dict[str, Options], _words("a table of detector names, each a table of its options "
                                                    "([detectors.NAME])")] = {}
    run: _Run = _Run()

    @field_validator("name")
    @classmethod
    def _plain(cls, name: str) -> str:
        # The name is a folder under ./oodbench-results and what --benchmark takes: one plain path component.
        if name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(f"must be a plain name (no '/', '\\', NUL, not '.' or '..'), got {name!r}")
        return name


def _model_in(annotation: Any) -> type[_Table] | None:
    """The table model an annotation holds (itself, a list's items, an Annotated's type), else None."""
    if isinstance(annotation, type) and issubclass(annotation, _Table):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _explain(error: dict[str, Any], raw: dict[str, Any]) -> str:
    """One pydantic error as ``where: problem``, ``where`` in TOML's dotted form (``sources.attacks[0].eps``)."""
    loc = error["loc"]
    where = ""            # the whole location, dotted
    table: type[_Table] | None = _File  # the table model the next key belongs to
    container, container_where = _File, ""
    field_where, field_info, field_depth = "", None, 0  # the deepest declared field on the way
    for depth, part in enumerate(loc, 1):
        if isinstance(part, int):
            where += f"[{part}]"
            continue
        container, container_where = table, where
        where = f"{where}.{part}" if where else str(part)
        fields = table.model_fields if table is not None else {}
        if part in fields:
            field_where, field_info, field_depth = where, fields[part], depth
            table = _model_in(fields[part].annotation)
        else:
            table = None
    kind = error["type"]
    if kind == "extra_forbidden" and container is not None:
        key = loc[-1]
        return (f"{where}: unknown key {key} in {container_where or 'the top level'}; "
                f"allowed: {', '.join(sorted(container.model_fields))}")
    if kind == "value_error":
        return f"{where}: {error['ctx']['error']}"
    if kind in ("model_type", "model_attributes_type", "dict_type") and table is not None and len(loc) > field_depth:
        return f"{where}: must be {table.expected}, got {error['input']!r}"  # an item of a list of tables
    if field_info is None:
        return f"{where}: {error['msg']}"
    extra = field_info.json_schema_extra if isinstance(field_info.json_schema_extra, dict) else {}
    # pydantic keeps a field's bounds (ge, lt, min_length) apart from its annotation: put them back for the words
    annotation = (Annotated[(field_info.annotation, *field_info.metadata)] if field_info.metadata
                  else field_info.annotation)
    words = extra.get("expected") or (field_info.annotation.expected if field_info.annotation is table
                                      and table is not None else expected(annotation))
    if kind == "missing" and len(loc) == field_depth:
        return f"{field_where}: missing; must be {words}"
    value: Any = raw
    try:
        for part in loc[:field_depth]:
            value = value[part]
    except (KeyError, IndexError, TypeError):  # a value the schema rewrote (an OOD source given by name alone)
        value = error["input"]
    return f"{field_where}: must be {words}, got {value!r}"


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

    The schema is the pydantic models above; the first problem found is reported as one line
    (``FILE: sources.attacks[0].eps: must be ...``). Unknown keys are refused rather than
    ignored. Whether the named plugins exist is checked by the caller, which holds the registry.
    """
    path = Path(path)
    raw_bytes, raw = _read(path)
    try:
        data = _File.model_validate(raw)
    except ValidationError as exc:
        # an unknown key first: a typo ([modle]) also makes what it meant missing, and the typo is the news
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise BenchmarkError(f"{path}: {_explain(errors[0], raw)}") from None
    extra = []
    for key, value in (data.sources.model_extra or {}).items():
        tables = [value] if isinstance(value, dict) else value
        if not (isinstance(tables, list) and tables and all(isinstance(t, dict) for t in tables)):
            allowed = ", ".join(sorted(_Sources.model_fields))
            raise BenchmarkError(f"{path}: sources.{key}: unknown key {key} in sources; allowed: {allowed}, or a "
                                 f"failure-source plugin's tables of options ([[sources.PLUGIN]]), got {value!r}")
        extra += [PluginRef(key, dict(table)) for table in tables]
    ood = tuple(OODRef(item.name or item.dataset, item.dataset, dict(item.options)) for item in data.sources.ood)
    attacks = tuple(AttackRef(item.plugin, tuple(float(e) for e in item.eps), dict(item.options))
                    for item in data.sources.attacks)
    return Benchmark(
        name=data.name,
        description=data.description,
        path=path,
        sha256=hashlib.sha256(raw_bytes).hexdigest(),
        in_distribution=PluginRef(data.in_distribution.dataset, dict(data.in_distribution.options)),
        model=PluginRef(data.model.plugin, dict(data.model.options)),
        mistakes=data.sources.mistakes,
        ood=ood,
        attacks=attacks,
        attack_subset=data.sources.attack_subset,
        seeds=data.run.seeds,
        batch_size=data.run.batch_size,
        holdout_size=data.run.holdout_size,
        holdout_fraction=float(data.run.holdout_fraction),
        test_subset=data.run.test_subset,
        default=data.default,
        labels_per_class=data.in_distribution.labels_per_class,
        precision=data.run.precision,
        extra_sources=tuple(extra),
        detector_options={name: dict(options) for name, options in data.detectors.items()},
    )
