"""The performance scripts' own tests: each runs a script of ``benchmarks/`` in its quick mode and checks what
it reports. They live apart from the suite of ``tests/`` and are all slow-marked: CI runs them in its second
step (``python -m pytest -m slow``) with the other slow checks."""
import os
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1]
# The scripts are a folder of scripts, not a package; shared_files (the real files of ../shared) is the suite's.
sys.path[:0] = [str(BENCHMARKS), str(BENCHMARKS.parent / "tests")]

# Two cores in CI: one intra-op thread per test process keeps timings stable and avoids oversubscription.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    for item in items:
        if BENCHMARKS / "tests" in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def registry():
    from oodbench.plugins import build_registry

    return build_registry(strict=True)
