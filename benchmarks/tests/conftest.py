"""The performance scripts' own tests: each runs a script of ``benchmarks/`` in its quick mode and checks what
it reports. They live apart from the suite of ``tests/`` and are all slow-marked: CI runs them in its second
step (``python -m pytest -m slow``) with the other slow checks. The fixtures they share with the suite
(``registry``, the torch thread setting) and ``tests/`` on ``sys.path`` (for ``shared_files``, the real files of
../shared) come from the repository's root ``conftest.py``."""
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1]
# The scripts are a folder of scripts, not a package.
sys.path.insert(0, str(BENCHMARKS))


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if BENCHMARKS / "tests" in item.path.parents:
            item.add_marker(pytest.mark.slow)
