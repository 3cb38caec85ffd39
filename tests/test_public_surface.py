"""One public surface: plugins import the core only through ``oodbench`` and ``oodbench.api``.

Parsed, not imported, so a file that would fail to import is still checked, and so are
imports inside functions. Plugin tests may also use the test kit (``oodbench.testing``).
The core, in turn, names no built-in plugin module.
"""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import oodbench
import oodbench.api as api
from oodbench.classifier import ClassifierHandle

ROOT = Path(__file__).resolve().parents[1]
PUBLIC = {"oodbench": set(oodbench.__all__), "oodbench.api": set(api.__all__)}
TEST_KIT = {"oodbench.testing"}


def _is_test(path: Path) -> bool:
    return path.name.startswith("test_") or "tests" in path.parts


def _plugin_files() -> list[Path]:
    """Every module of the built-ins and the examples, but the built-ins' tests (``plugins/tests``): not part of
    the package, they are the project's suite and drive the built-ins through the core's runner like ``tests/``."""
    files = sorted((ROOT / "plugins").rglob("*.py")) + sorted((ROOT / "examples").rglob("*.py"))
    return [f for f in files if ".egg-info" not in str(f) and "build" not in f.relative_to(ROOT).parts
            and ROOT / "plugins" / "tests" not in f.parents]


def _core_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every absolute import of ``oodbench`` or a submodule in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "oodbench" or alias.name.startswith("oodbench."):
                    found.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "oodbench" or node.module.startswith("oodbench."):
                found.append((node.lineno, node.module, [alias.name for alias in node.names]))
    return found


def test_plugins_import_only_the_public_surface():
    problems = []
    files = _plugin_files()
    assert files, "no plugin modules found"
    for path in files:
        where = path.relative_to(ROOT)
        allowed = set(PUBLIC) | (TEST_KIT if _is_test(path) else set())
        for line, module, names in _core_imports(path):
            if module not in allowed:
                problems.append(f"{where}:{line}: imports {module}; plugins import only from "
                                f"{' or '.join(sorted(allowed))}")
                continue
            if module in PUBLIC:
                for name in names:
                    # `from oodbench import api` is the surface itself
                    if name not in PUBLIC[module] and not (module == "oodbench" and name == "api"):
                        problems.append(f"{where}:{line}: imports {name} from {module}, which is not in its "
                                        f"__all__ (the public surface)")
    assert not problems, "\n".join(problems)


def test_the_core_names_no_plugin():
    problems = []
    for path in sorted((ROOT / "oodbench").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # importlib.import_module("oodbench_plugins...") names a plugin just as well
                if node.value.split(".")[0] == "oodbench_plugins":
                    modules = [node.value]
            for module in modules:
                if module.split(".")[0] == "oodbench_plugins":
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: names {module}")
    assert not problems, "the core names no plugin (built-ins register through entry points):\n" + "\n".join(problems)


def test_all_lists_what_exists():
    for module, names in ((oodbench, oodbench.__all__), (api, api.__all__)):
        missing = [name for name in names if not hasattr(module, name)]
        assert not missing, f"{module.__name__}.__all__ names {missing}, which it does not define"


def test_the_engine_implements_the_classifier_protocol():
    """Every member of ``api.Classifier`` exists on ``ClassifierHandle`` with the same parameters."""
    members = [name for name in vars(api.Classifier) if not name.startswith("_")]
    members += list(api.Classifier.__annotations__)
    assert {"outputs", "input_gradient", "head", "head_weight_bias", "has_head", "device", "activity"} <= set(members)
    for name in members:
        assert hasattr(ClassifierHandle, name) or name in api.Classifier.__annotations__, name
        declared = getattr(api.Classifier, name, None)
        if inspect.isfunction(declared):
            ours, theirs = inspect.signature(declared), inspect.signature(getattr(ClassifierHandle, name))
            assert list(ours.parameters) == list(theirs.parameters), f"{name}: {ours} vs {theirs}"
            assert [p.default for p in ours.parameters.values()] == \
                [p.default for p in theirs.parameters.values()], f"{name}: {ours} vs {theirs}"
        elif isinstance(declared, property):
            assert isinstance(getattr(ClassifierHandle, name), property), name


def test_a_handle_is_a_classifier():
    import torch

    handle = ClassifierHandle(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert isinstance(handle, api.Classifier)


def test_check_scores():
    import numpy as np
    import pytest

    assert api.check_scores([1, 2], 2).dtype == np.float64
    with pytest.raises(api.PluginError, match=r"shape \(3,\) for 2 inputs of val"):
        api.check_scores(np.zeros(3), 2, "val")
    with pytest.raises(api.PluginError, match="1 non-finite values"):
        api.check_scores([0.0, np.nan], 2)


def test_fpr_at_tpr_is_the_leaderboards():
    import numpy as np

    from oodbench import metrics

    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 200), rng.normal(0, 1, 150)
    assert api.fpr_at_tpr(pos, neg) == metrics.fpr_at_tpr(pos, neg)
    assert api.fpr_at_tpr(pos, neg, 0.5) == metrics.fpr_at_tpr(pos, neg, 0.5)
