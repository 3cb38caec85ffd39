"""Tiny third-party plugins for the core's tests: each registers through the hooks as an installed package would,
so a core test needs no built-in plugin of its kind. ``classifier`` holds a whole benchmark (``fake``: data, a
network with a head, detectors, sources), ``sources`` failure sources that misbehave."""
from __future__ import annotations

from pathlib import Path

import torch


def fake_registry(*extra: object):
    """Every installed plugin, the fakes of this folder, and ``extra`` (more hook classes)."""
    from oodbench.plugins import build_registry

    from .classifier import FakeClassifier
    from .sources import FakeSources

    return build_registry(extra_plugins=[FakeClassifier(), FakeSources(), *extra], strict=True)


def fake_options(registry, detectors: str, cache: Path | str | None, **kw):
    """RunOptions of the ``fake`` benchmark (``fake_plugins/fake.toml``) for ``detectors`` on the CPU, seed 0 unless told."""
    from oodbench.benchmark import load_benchmark
    from oodbench.cli import parse_detectors
    from oodbench.runner import RunOptions

    bench = load_benchmark(registry.get("benchmarks", "fake").target)
    return RunOptions(benchmark=bench, detectors=parse_detectors(detectors), seeds=kw.pop("seeds", [0]),
                      cache_dir=cache, data_dir=Path("."), device=torch.device("cpu"), progress=False, **kw)
