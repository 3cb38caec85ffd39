"""DEVIATIONS.md lists every deviation in one place: each registered plugin whose class docstring
has a "Deviation" paragraph must be named there, in backticks, under its registered name."""
from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import pytest

from oodbench.plugins import build_registry

DEVIATIONS = Path(__file__).resolve().parents[2] / "DEVIATIONS.md"
KINDS = ("detectors", "models", "attacks", "datasets", "sources")
# "Deviation:", "Deviations:", "Deviations from the paper (explicit):", "Deviations and choices:"
LABEL = re.compile(r"\bDeviations?\b")


@functools.cache
def plugins_with_deviations() -> tuple[tuple[str, str, str], ...]:
    registry = build_registry(strict=True)
    found = []
    for kind in KINDS:
        for name in registry.names(kind):
            target = registry.get(kind, name).target
            if LABEL.search(inspect.getdoc(target) or ""):
                found.append((kind, name, f"{target.__module__}.{target.__qualname__}"))
    return tuple(found)


def missing_from(text: str, plugins: tuple[tuple[str, str, str], ...]) -> list[str]:
    return [f"{kind} `{name}` ({where})" for kind, name, where in plugins if f"`{name}`" not in text]


def test_every_plugin_with_a_deviation_paragraph_is_listed():
    plugins = plugins_with_deviations()
    # The built-ins have such paragraphs (pixelcnn, waic, mahalanobis-ensemble, the models, ...): a
    # docstring convention that changed would otherwise make this test pass vacuously.
    assert len(plugins) >= 10, plugins
    missing = missing_from(DEVIATIONS.read_text(encoding="utf-8"), plugins)
    assert not missing, "DEVIATIONS.md does not list: " + ", ".join(missing)


@pytest.mark.parametrize("name", ["mahalanobis-ensemble", "pixelcnn", "wide-resnet"])
def test_the_check_fails_when_an_entry_is_removed(name):
    plugins = plugins_with_deviations()
    text = DEVIATIONS.read_text(encoding="utf-8")
    assert any(n == name for _, n, _ in plugins)
    assert missing_from(text, plugins) == []
    # Remove every backticked mention of the plugin (a whole entry, as far as the check can tell).
    assert missing_from(text.replace(f"`{name}`", name), plugins) != []
