"""Meta-tests: every hook spec is documented in CONTRIBUTING.md and exercised by a test."""
import inspect
from pathlib import Path

import pytest

from oodbench import hookspecs

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted(name for name, fn in vars(hookspecs).items()
               if name.startswith("oodbench_") and callable(fn) and hasattr(fn, "oodbench_spec"))


def test_there_are_hook_specs():
    assert SPECS == ["oodbench_register_attacks", "oodbench_register_benchmarks", "oodbench_register_datasets",
                     "oodbench_register_detectors", "oodbench_register_executors", "oodbench_register_models",
                     "oodbench_register_sources"]


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_documented_with_matching_arguments(name):
    arguments = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    assert f"`{name}({arguments})`" in (ROOT / "CONTRIBUTING.md").read_text()
    assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"


@pytest.mark.parametrize("name", SPECS)
def test_hook_is_implemented_by_a_builtin_and_covered_by_a_test(name, registry):
    kind = name.removeprefix("oodbench_register_")
    assert registry.names(kind), f"no built-in plugin implements {name}"
    tests = "\n".join(p.read_text() for folder in ("tests", "plugins/tests") for p in (ROOT / folder).glob("test_*.py")
                      if p != Path(__file__).resolve())
    assert f'"{kind}"' in tests, f"no test looks up {kind}"
