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

import inspect
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import pluggy

from . import hookspecs
from .api import Attack, Dataset, Detector, Executor, Model, Plugin

KINDS: dict[str, type] = {
    "datasets": Dataset,
    "models": Model,
    "attacks": Attack,
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


def resolve_options(entry: Entry, options: dict[str, Any], seed: int | None = None) -> dict[str, Any]:
    """Validate ``options`` against the class's ``__init__`` and fill in every default.

    Returns the complete keyword arguments (recorded in results so a row can be reproduced).
    """
    cls = entry.target
    params = {
        n: p for n, p in inspect.signature(cls.__init__).parameters.items()
        if n != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    merged = {**entry.defaults, **options}
    unknown = sorted(set(merged) - set(params))
    if unknown:
        valid = ", ".join(n for n in params if n != "seed") or "(none)"
        raise UnknownPluginError(f"{entry.kind[:-1]} '{entry.name}' has no option {', '.join(unknown)}; options: {valid}")
    resolved = {}
    for n, p in params.items():
        if n == "seed":
            continue
        if n in merged:
            resolved[n] = merged[n]
        elif p.default is not inspect.Parameter.empty:
            resolved[n] = p.default
        else:
            raise UnknownPluginError(f"{entry.kind[:-1]} '{entry.name}' needs option '{n}'")
    if "seed" in params and seed is not None:
        resolved["seed"] = seed
    return resolved


def instantiate(entry: Entry, options: dict[str, Any], seed: int | None = None) -> Any:
    return entry.target(**resolve_options(entry, options, seed))
