"""Benchmark: the whole default run, nothing cached (issue target: under 60 s on 2 CPU cores).

Under the normal test run benchmarks are disabled and the body runs once, as a check. To
measure and write the figures to a file::

    python -m pytest benchmarks/tests/test_bench_default_run.py --benchmark-enable --benchmark-json=benchmark-default-run.json
"""
from pathlib import Path

import pytest
import torch

from oodbench.benchmark import load_benchmark
from oodbench.cli import parse_detectors
from oodbench.leaderboard import results_frame
from oodbench.runner import RunOptions, run_benchmark

CORE_FOUR = "msp,gmm,mahalanobis,odin"


@pytest.mark.parametrize("detectors", [CORE_FOUR], ids=["core-four"])
def test_default_run_from_scratch(benchmark, registry, detectors):
    bench = load_benchmark(registry.get("benchmarks", "digits").target)
    opts = RunOptions(benchmark=bench, detectors=parse_detectors(detectors), seeds=[0], cache_dir=None,
                      data_dir=Path("."), device=torch.device("cpu"), progress=False)
    result = benchmark.pedantic(run_benchmark, args=(opts, registry), rounds=1, iterations=1)
    frame = results_frame(result.rows)
    assert (frame["status"] == "ok").all()
    passes = result.meta["per_seed"][0]["passes"]
    benchmark.extra_info.update(
        rows=len(frame), wall_seconds=result.meta["wall_seconds"], torch_threads=torch.get_num_threads(),
        forward=sum(p["forward"] for p in passes.values()),
        forward_backward=sum(p["forward_backward"] for p in passes.values()),
    )
