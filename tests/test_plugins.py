"""Discovery through real entry points, and fault-tolerant registration."""
from importlib import metadata

import numpy as np
import pytest

from oodbench import hookimpl
from oodbench.api import Detector
from oodbench.plugins import PluginLoadError, UnknownPluginError, build_registry, create_manager, load_entry_points, resolve_options


def test_builtins_arrive_through_the_entry_point_group(registry):
    groups = {ep.name: ep.value for ep in metadata.entry_points(group="oodbench")}
    assert groups["builtin-detectors"] == "oodbench_plugins.detectors"
    for kind, name in [("detectors", "msp"), ("datasets", "digits"), ("models", "small-cnn"),
                       ("attacks", "fgsm"), ("benchmarks", "digits")]:
        entry = registry.get(kind, name)
        assert entry.provider == "oodbench", entry
        assert entry.summary, f"{kind} {name} has no one-line description"


class Throwaway(Detector):
    """A detector defined in a test: minus the sum of logits."""

    name = "throwaway"

    def __init__(self, *, scale: float = 1.0):
        self.scale = scale

    def score(self, view):
        return -self.scale * view.logits.sum(1)


class ThrowawayPlugin:
    @hookimpl
    def oodbench_register_detectors(self, register):
        register(Throwaway)
        register(Throwaway, name="throwaway-x2", scale=2.0)


def test_a_detector_registered_in_a_test_is_found_with_its_defaults():
    registry = build_registry(extra_plugins=[ThrowawayPlugin()], strict=True)
    assert "throwaway" in registry.names("detectors") and "msp" in registry.names("detectors")
    assert resolve_options(registry.get("detectors", "throwaway-x2"), {}) == {"scale": 2.0}
    with pytest.raises(UnknownPluginError, match="no option k; options: scale"):
        resolve_options(registry.get("detectors", "throwaway"), {"k": 3})


def test_duplicate_name_names_both_providers():
    class Duplicate:
        @hookimpl
        def oodbench_register_detectors(self, register):
            class Msp(Detector):
                """Impostor."""
                name = "msp"
            register(Msp)

    with pytest.warns(UserWarning, match="'msp' is registered twice: by oodbench and by"):
        registry = build_registry(extra_plugins=[Duplicate()], strict=False)
    assert registry.get("detectors", "msp").provider == "oodbench"  # the first one stays
    with pytest.raises(PluginLoadError, match="registered twice"):
        build_registry(extra_plugins=[Duplicate()], strict=True)


class _BrokenEntryPoint:
    name = "oodbench-broken"
    value = "oodbench_broken_plugin"
    group = "oodbench"

    class dist:
        name, version = "oodbench-broken", "0.0.1"

    def load(self):
        raise ImportError("No module named 'tensorflow'")


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_work(monkeypatch):
    real = metadata.entry_points

    def with_broken(**kwargs):
        return [*real(**kwargs), _BrokenEntryPoint()]

    monkeypatch.setattr(metadata, "entry_points", with_broken)
    with pytest.warns(UserWarning, match=r"oodbench-broken.*0\.0\.1.*No module named 'tensorflow'"):
        registry = build_registry(strict=False)
    assert "msp" in registry.names("detectors")
    assert any("oodbench-broken" in p for p in registry.problems)
    with pytest.raises(PluginLoadError, match="failed to import"):
        build_registry(strict=True)
    monkeypatch.setenv("OODBENCH_BLOCK_PLUGINS", "oodbench-broken")
    assert build_registry(strict=True).problems == []


def test_a_hook_that_raises_is_isolated():
    class Raising:
        @hookimpl
        def oodbench_register_detectors(self, register):
            raise RuntimeError("boom")

    with pytest.warns(UserWarning, match="failed in oodbench_register_detectors: RuntimeError: boom"):
        registry = build_registry(extra_plugins=[Raising()], strict=False)
    assert "msp" in registry.names("detectors")


def test_misspelt_hook_is_an_error_not_silence():
    class Misspelt:
        @hookimpl
        def oodbench_register_detector(self, register):  # missing 's'
            pass

    with pytest.raises(PluginLoadError, match="unknown hook"):
        build_registry(extra_plugins=[Misspelt()], strict=True)


def test_only_subclasses_of_the_api_bases_register():
    class Wrong:
        @hookimpl
        def oodbench_register_detectors(self, register):
            register(np.ndarray, name="array")

    with pytest.warns(UserWarning, match="must register subclasses of oodbench.api.Detector"):
        build_registry(extra_plugins=[Wrong()], strict=False)


def test_load_only_some_entry_points(monkeypatch):
    monkeypatch.setenv("OODBENCH_LOAD_PLUGINS", "builtin-detectors")
    pm = create_manager()
    load_entry_points(pm, [], strict=True)
    assert [name for name, _ in pm.list_name_plugin()] == ["builtin-detectors"]
