"""Fixtures shared by the three test folders: the core's suite (``tests/``), the built-ins' tests beside their code
(``plugins/tests/``) and the performance scripts' tests (``benchmarks/tests/``).

None of them is a package: the helper modules the tests import by name (``torchvision_fakes``, ``shared_files``,
``fake_plugins``, and ``test_run``'s ``_options`` or ``test_cli``'s ``run_cli``) live in ``tests/``, which is put on
``sys.path`` here, so a folder collected alone (``python -m pytest plugins/tests``) finds them too."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision.datasets as tvd

ROOT = Path(__file__).resolve().parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

from torchvision_fakes import md5  # noqa: E402  (after the path)

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


# torchvision checks the md5 of CIFAR batches and SVHN .mat files against the official releases,
# which fakes cannot match: these make it expect the fakes' md5s, so its check still runs on each read.
@pytest.fixture
def cifar_md5_of_fakes(monkeypatch):
    """Make torchvision expect the md5s of the fake files written under ``root``."""
    def patch(root: Path, cls=tvd.CIFAR10):
        folder = root / cls.base_folder
        monkeypatch.setattr(cls, "train_list", [[n, md5(folder / n)] for n, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[n, md5(folder / n)] for n, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(folder / cls.meta["filename"])})
    return patch


@pytest.fixture
def svhn_md5_of_fakes(monkeypatch):
    def patch(root: Path, split="test"):
        url, name, _ = tvd.SVHN.split_list[split]
        monkeypatch.setattr(tvd.SVHN, "split_list", {**tvd.SVHN.split_list, split: [url, name, md5(root / name)]})
    return patch
