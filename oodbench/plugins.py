"""Plugin discovery: entry points -> pluggy -> a registry of named plugin classes.

Every plugin, built-in or third-party, arrives through the ``oodbench`` entry-point group.
Loading is fault tolerant: a plugin whose import or hook fails, or that registers a name
already taken, is reported with its distribution and the error, and the rest keep working.
``strict=True`` (``--strict-plugins`` or ``OODBENCH_STRICT_PLUGINS=1``) makes that fatal.

Environment variables:

* ``OODBENCH_STRICT_PLUGINS=1``: any plugin problem is an error.
* ``OODBENCH_LOAD_PLUGINS=a,b``: load only these entry points (by entry-point name).
* ``OODBENCH_BLOCK_PLUGINS=a,b``: skip these entry points.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import re
import tomllib
import types
import typing
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .api import Attack, Dataset, Detector, Executor, FailureSource, Model, Plugin

KINDS: dict[str, type] = {
    "datasets": Dataset,
    "models": Model,
    "attacks": Attack,
    "sources": FailureSource,
    "detectors": Detector,
    "executors": Executor,
    "benchmarks": Path,
}


class PluginLoadError(Exception):
    """A plugin could not be loaded or registered (fatal only in strict mode)."""


class UnknownPluginError(KeyError):
    """A name that no installed plugin registered; the message lists what exists."""

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Entry:
    """One registered name: the class (or benchmark file), its default options, its provider."""

    kind: str
    name: str
    target: Any
    defaults: dict[str, Any]
    provider: str  # distribution name, or the plugin's name when registered by hand
    provider_version: str

    @property
    def summary(self) -> str:
        if self.kind == "benchmarks":
            return str(tomllib.loads(Path(self.target).read_text()).get("description", "")).strip()
        doc = inspect.getdoc(self.target) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    @property
    def version(self) -> str:
        return str(getattr(self.target, "version", "1"))


@dataclass
class Registry:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    problems: list[str] = field(default_factory=list)

    def get(self, kind: str, name: str) -> Entry:
        try:
            return self.entries[kind][name]
        except KeyError:
            raise UnknownPluginError(unknown_name_message(kind, name, self.entries[kind])) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    singular = kind[:-1]
    available = ", ".join(sorted(known)) or "(none installed)"
    return f"unknown {singular} '{name}'. Available {kind}: {available}"


def _split_env(var: str) -> set[str] | None:
    value = os.environ.get(var, "").strip()
    return {v.strip() for v in value.split(",") if v.strip()} if value else None


def create_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("oodbench")
    pm.add_hookspecs(hookspecs)
    return pm


def load_entry_points(pm: pluggy.PluginManager, problems: list[str], strict: bool) -> None:
    """Register every ``oodbench`` entry point with ``pm``; a failing import becomes a problem."""
    only, blocked = _split_env("OODBENCH_LOAD_PLUGINS"), _split_env("OODBENCH_BLOCK_PLUGINS") or set()
    for ep in sorted(metadata.entry_points(group="oodbench"), key=lambda e: e.name):
        if (only is not None and ep.name not in only) or ep.name in blocked:
            continue
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "?"
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken third-party plugin must not take the CLI down
            _problem(problems, strict, f"plugin '{ep.name}' ({dist}) failed to import: {type(exc).__name__}: {exc}")
            continue
        pm.register(plugin, name=ep.name)
        _DIST_OF_PLUGIN[id(plugin)] = (ep.dist.name, ep.dist.version) if ep.dist else (ep.name, "?")


_DIST_OF_PLUGIN: dict[int, tuple[str, str]] = {}


def _plugin_label(plugin: object) -> str:
    return getattr(plugin, "__name__", None) or type(plugin).__qualname__


def _problem(problems: list[str], strict: bool, message: str) -> None:
    if strict:
        raise PluginLoadError(message)
    problems.append(message)
    warnings.warn(message, stacklevel=3)


def build_registry(
    pm: pluggy.PluginManager | None = None,
    *,
    strict: bool | None = None,
    extra_plugins: Iterable[object] = (),
) -> Registry:
    """Discover plugins and collect everything they register.

    ``extra_plugins`` are registered by hand in addition to entry points (tests, notebooks).
    """
    if strict is None:
        strict = os.environ.get("OODBENCH_STRICT_PLUGINS", "") not in ("", "0")
    registry = Registry()
    if pm is None:
        pm = create_manager()
        load_entry_points(pm, registry.problems, strict)
    for plugin in extra_plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        _problem(registry.problems, strict, f"plugin declares an unknown hook: {exc}")
    for kind in KINDS:
        hook = getattr(pm.hook, f"oodbench_register_{kind}")
        for impl in hook.get_hookimpls():  # registration order: entry points first, then by hand
            provider, version = _DIST_OF_PLUGIN.get(id(impl.plugin), (_plugin_label(impl.plugin), "?"))
            register = _Registrar(registry, kind, provider, version, strict)
            try:
                impl.function(register=register)
            except Exception as exc:
                _problem(
                    registry.problems, strict,
                    f"plugin '{impl.plugin_name}' ({provider}) failed in oodbench_register_{kind}: "
                    f"{type(exc).__name__}: {exc}",
                )
    return registry


class _Registrar:
    def __init__(self, registry: Registry, kind: str, provider: str, version: str, strict: bool):
        self.registry, self.kind, self.provider, self.version, self.strict = registry, kind, provider, version, strict

    def __call__(self, target: Any, name: str | None = None, **defaults: Any) -> None:
        base = KINDS[self.kind]
        if self.kind == "benchmarks":
            target = Path(target)
            name = name or str(tomllib.loads(target.read_text()).get("name") or target.stem)
        elif not (isinstance(target, type) and issubclass(target, base) and issubclass(target, Plugin)):
            raise TypeError(f"{self.kind} must register subclasses of oodbench.api.{base.__name__}, got {target!r}")
        else:
            name = name or target.name
        if not name:
            raise TypeError(f"{target!r} has no name: set the class attribute 'name' or pass name=")
        existing = self.registry.entries[self.kind].get(name)
        if existing is not None:
            _problem(
                self.registry.problems, self.strict,
                f"{self.kind[:-1]} name '{name}' is registered twice: by {existing.provider} and by "
                f"{self.provider}; keeping the first",
            )
            return
        self.registry.entries[self.kind][name] = Entry(self.kind, name, target, defaults, self.provider, self.version)


class OptionError(ValueError):
    """A plugin option whose value does not fit the constructor's annotation (one line: plugin, option, value,
    what was expected)."""

    def __init__(self, kind: str, plugin: str, option: str, value: Any, expected: str):
        self.kind, self.plugin, self.option, self.value, self.expected = kind, plugin, option, value, expected
        super().__init__(f"{kind[:-1]} '{plugin}' {self.detail}")

    @property
    def detail(self) -> str:
        """The message without the plugin: ``option k='abc': expected an integer``."""
        return f"option {self.option}={self.value!r}: expected {self.expected}"

    def __reduce__(self):  # picklable across worker processes despite the keyword-rich constructor
        return type(self), (self.kind, self.plugin, self.option, self.value, self.expected)


@dataclass(frozen=True)
class OptionInfo:
    """One option of a plugin, as ``oodbench list -v`` shows it."""

    name: str
    type: str  # in words, from the annotation ("int >= 1", "tuple[float, ...]"); "" when unannotated
    default: Any
    required: bool
    description: str


def resolve_options(entry: Entry, options: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """Validate ``options`` against the class's ``__init__`` and fill in every default.

    Each value given (by the user or as a registered default) is checked and converted against its
    parameter's annotation, with pydantic, as if it came from TOML: an int is a fine float and a list a fine
    tuple, but ``2.5`` or ``"2"`` is no int and ``1`` no bool; ``Annotated[int, Field(ge=1)]`` bounds and
    ``Literal`` choices hold. A value that does not fit raises :class:`OptionError`; unannotated parameters,
    ``Any`` and annotations that cannot be resolved or validated pass values through unchanged.

    Returns the complete keyword arguments, converted (recorded in results so a row can be reproduced).
    """
    cls = entry.target
    params = _parameters(cls)
    merged = {**entry.defaults, **options}
    unknown = sorted(set(merged) - set(params))
    if unknown:
        valid = ", ".join(n for n in params if n != "seed") or "(none)"
        raise UnknownPluginError(f"{entry.kind[:-1]} '{entry.name}' has no option {', '.join(unknown)}; options: {valid}")
    types_ = _option_types(cls)
    resolved = {}
    for n, p in params.items():
        if n == "seed":
            continue
        if n in merged:
            resolved[n] = _convert(entry, n, merged[n], *types_.get(n, (None, None)))
        elif p.default is not inspect.Parameter.empty:
            resolved[n] = p.default
        else:
            raise UnknownPluginError(f"{entry.kind[:-1]} '{entry.name}' needs option '{n}'")
    if "seed" in params and seed is not None:
        resolved["seed"] = seed
    return resolved


def option_infos(entry: Entry) -> list[OptionInfo]:
    """The options ``entry`` takes (``seed`` is the run's, not an option), with type, default and description."""
    if entry.kind == "benchmarks":
        return []
    params = {n: p for n, p in _parameters(entry.target).items() if n != "seed"}
    types_ = _option_types(entry.target)
    descriptions = option_descriptions(entry.target, list(params))
    out = []
    for n, p in params.items():
        hint = types_.get(n, (None, None))[0]
        if hint is None and p.annotation is not inspect.Parameter.empty:
            hint = p.annotation  # unresolvable: shown as written
        required = n not in entry.defaults and p.default is inspect.Parameter.empty
        default = entry.defaults.get(n, None if required else p.default)
        description = _field_description(hint) or descriptions.get(n, "")
        out.append(OptionInfo(n, "" if hint is None else type_name(hint), default, required, description))
    return out


def _field_description(hint: Any) -> str:
    """The description of ``Annotated[int, Field(ge=1, description="...")]``, if it has one."""
    if typing.get_origin(hint) is not typing.Annotated:
        return ""
    found = [m.description for m in typing.get_args(hint)[1:] if isinstance(getattr(m, "description", None), str)]
    return found[0] if found else ""


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    return {
        n: p for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


@functools.cache
def _option_types(cls: type) -> dict[str, tuple[Any, Any]]:
    """Per annotated parameter of ``cls.__init__``: (resolved annotation, pydantic TypeAdapter or None).

    The adapter is None where values pass through: ``Any``, or a type pydantic cannot validate (a tensor).
    """
    from pydantic import TypeAdapter

    out = {}
    for name, hint in _hints(cls.__init__).items():
        if name == "return":
            continue
        try:
            adapter = None if hint is Any else TypeAdapter(hint)
        except Exception:  # pydantic has no schema for it (arbitrary classes): nothing to check against
            adapter = None
        out[name] = (hint, adapter)
    return out


def _hints(function: Any) -> dict[str, Any]:
    """``function``'s annotations resolved (string ones too); one that cannot be resolved is left out."""
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:
        pass
    hints = {}
    for name, annotation in getattr(function, "__annotations__", {}).items():
        def one() -> None: ...
        one.__annotations__ = {name: annotation}
        try:
            hints.update(typing.get_type_hints(one, globalns=getattr(function, "__globals__", {}),
                                               include_extras=True))
        except Exception:  # e.g. a name imported only under TYPE_CHECKING: passed through unchecked
            continue
    return hints


def _convert(entry: Entry, option: str, value: Any, hint: Any, adapter: Any) -> Any:
    """``value`` checked against ``hint`` and converted, as pydantic's strict mode reads JSON (which is what
    TOML and bracket options are): no string or fractional number becomes an int, no 0/1 a bool."""
    from pydantic import ValidationError

    if adapter is None:
        return value
    try:
        try:
            text = json.dumps(value, allow_nan=True)
        except (TypeError, ValueError):  # not JSON-like (handed in from Python): validated as it is
            return adapter.validate_python(value, strict=True)
        return adapter.validate_json(text, strict=True)
    except ValidationError:
        raise OptionError(entry.kind, entry.name, option, value, expected(hint)) from None


# -- annotations in words ---------------------------------------------------------------------

_WORDS = {int: ("an integer", "integers"), float: ("a number", "numbers"), bool: ("true or false", "true/false values"),
          str: ("a string", "strings"), Path: ("a path", "paths"), type(None): ("none", "nones")}
_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="), ("multiple_of", "a multiple of"),
           ("min_length", "at least"), ("max_length", "at most"))


def expected(hint: Any) -> str:
    """What a value of annotation ``hint`` must be, in words: ``an integer >= 1``, ``a list of numbers``."""
    return _words(hint, plural=False)


def _words(hint: Any, plural: bool) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return _words(args[0], plural) + _bounds(args[1:])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_words(a, plural) for a in args))
    if origin is typing.Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(map(repr, args))
    if hint in _WORDS:
        return _WORDS[hint][plural]
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple, set, frozenset):
        lists = "lists" if plural else "a list"
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{lists} of {len(args)} items ({', '.join(_words(a, False) for a in args)})"
        return f"{lists} of {_words(args[0], True)}" if args and args[0] is not Any else lists
    if origin is dict or hint is dict:
        return "tables (dicts)" if plural else "a table (dict)"
    return ("values of type " if plural else "a value of type ") + type_name(hint)


def _bounds(metadata: Iterable[Any]) -> str:
    from pydantic.fields import FieldInfo

    items = [m for meta in metadata for m in (meta.metadata if isinstance(meta, FieldInfo) else [meta])]
    parts = [f"{words} {getattr(m, attr)}" for m in items for attr, words in _BOUNDS
             if getattr(m, attr, None) is not None]
    return (" " + " and ".join(parts)) if parts else ""


def type_name(hint: Any) -> str:
    """``hint`` as a short type expression: ``int >= 1``, ``tuple[float, ...]``, ``int | None``."""
    if isinstance(hint, str):
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return type_name(args[0]) + _bounds(args[1:])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(map(repr, args))
    if hint is type(None):
        return "None"
    if hint is Any:
        return "Any"
    if hint is Ellipsis:
        return "..."
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


# -- descriptions from the class docstring -------------------------------------------------------

_HEADING = re.compile(r"^[A-Z][A-Za-z -]*:(\s|$)")  # "Deviations:", "Paper-scale:" end an Options block
_ITEM = re.compile(r"^\s*(?:[-*]\s+)?(?:``(\w+)``|(\w+))\s*:\s*(.*)$")


def option_descriptions(cls: type, names: list[str]) -> dict[str, str]:
    """Descriptions of ``names`` from the class docstring's ``Options:`` paragraph, as the built-ins write it.

    Two forms are read. Prose: ``Options: k=100 components (...); reg_covar=1e-4 added to every variance;
    ``seed`` (initialisation).`` -- clauses split at ``;``, each describing the options it names (``k=...``
    or a double-backquoted name) outside parentheses. Or one option per line under a bare ``Options:``
    line: ``k: number of components`` (or ````k````, optionally bulleted). A clause that says no more
    than the name and its default describes nothing; options the docstring does not name get "".
    """
    lines = (inspect.getdoc(cls) or "").splitlines()
    wanted = set(names)
    for i, line in enumerate(lines):
        found = re.search(r"\bOptions:", line)
        if found:
            rest = line[found.end():].strip()
            return _line_items(lines[i + 1:], wanted) if not rest else _prose(rest, lines[i + 1:], wanted)
    return {}


def _line_items(lines: list[str], wanted: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    current = None
    for line in lines:
        if not line.strip():
            if out or current:
                break
            continue
        item = _ITEM.match(line)
        name = item and (item.group(1) or item.group(2))
        if name in wanted:
            current = name
            out[name] = item.group(3).strip()
        elif current is None or _HEADING.match(line.strip()):
            break
        else:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return {k: v.rstrip(".").strip() for k, v in out.items() if v}


def _prose(first: str, lines: list[str], wanted: set[str]) -> dict[str, str]:
    block = [first]
    for line in lines:
        if not line.strip() or _HEADING.match(line.strip()):
            break
        block.append(line.strip())
    out: dict[str, str] = {}
    for clause in _split_top(" ".join(block).strip().rstrip("."), ";"):
        pieces = _split_top(clause, ",")
        starts = [_leading_name(p, wanted) for p in pieces]
        if len(pieces) > 1 and all(starts) and _says_nothing(pieces[-1], starts[-1], allow_parenthesis=True):
            parts = list(zip(starts, pieces))  # "max_iter=100, tol=1e-3 (sklearn's defaults)": one each
        else:
            parts = [(name, clause) for name in _names_outside_parentheses(clause, wanted)]
        for name, text in parts:
            text = " ".join(text.split()).rstrip(".").strip()
            if name not in out and not _says_nothing(text, name, allow_parenthesis=False):
                out[name] = text
    return out


def _split_top(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
        if char == separator and depth <= 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [p for p in [*parts, current.strip()] if p]


def _outside_parentheses(text: str) -> str:
    """``text`` with everything inside brackets blanked out (same length)."""
    out, depth = [], 0
    for char in text:
        depth += char in "([{"
        out.append(char if depth == 0 else " ")
        depth -= bool(depth and char in ")]}")
    return "".join(out)


_MENTION = re.compile(r"``(\w+)``|(?<![\w.])(\w+)\s*=")


def _names_outside_parentheses(text: str, wanted: set[str]) -> list[str]:
    names = [m.group(1) or m.group(2) for m in _MENTION.finditer(_outside_parentheses(text))]
    return list(dict.fromkeys(n for n in names if n in wanted))


def _leading_name(text: str, wanted: set[str]) -> str | None:
    match = _MENTION.match(text.strip())
    name = match and (match.group(1) or match.group(2))
    return name if name in wanted else None


def _says_nothing(text: str, name: str, allow_parenthesis: bool) -> bool:
    """``text`` is only ``name`` and perhaps ``= value`` (and, if allowed, a parenthesis after them)."""
    rest = re.sub(rf"^(``{name}``|{name})\s*(=\s*[^\s(,;]+)?", "", text.strip()).strip()
    return not rest or (allow_parenthesis and rest.startswith("("))


def instantiate(entry: Entry, options: dict[str, Any], seed: int | None = None) -> Any:
    return entry.target(**resolve_options(entry, options, seed))
