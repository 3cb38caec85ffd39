import os
from pathlib import Path

import pytest
import torch

# Two cores in CI: one intra-op thread per test process keeps timings stable and avoids oversubscription.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One cache for the session: the digits CNN trains once and every test reuses it."""
    return tmp_path_factory.mktemp("oodbench-cache")


@pytest.fixture(scope="session")
def registry():
    from oodbench.plugins import build_registry

    return build_registry(strict=True)
