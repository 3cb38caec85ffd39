"""Memory of one EM iteration: bounded by the chunk, never an N x K matrix (issue #9, "memory bounded").

Each case runs in a fresh process, which creates the synthetic features x (float32 N x D), reads
its peak resident memory, runs one EM iteration from explicit parameters (KMeans is not what is
measured), and reads the peak again; the difference is what EM itself added. The ordinary test
run uses a size where an N x K float32 matrix (800 MB) would dwarf what chunking needs;
``OODBENCH_BENCH_FULL=1`` adds the issue's ImageNet-scale case (N=1,281,167, D=2048, K=1000: x is
10.5 GB, an N x K matrix would be another 5.1 GB), which needs ~12 GB of memory and minutes of CPU.
Results go to ``extra_info`` (``--benchmark-json``) and BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FULL = os.environ.get("OODBENCH_BENCH_FULL") == "1"
#: (N, D, K)
CASES = [(200_000, 64, 1000)] + ([(1_281_167, 2048, 1000)] if FULL else [])

SCRIPT = """
import json, sys, time
import torch
from oodbench.memory import peak_resident_bytes
from oodbench_plugins.detectors.gmm_em import DEFAULT_CHUNK_SIZE, fit_diagonal_gmm

n, d, k = map(int, sys.argv[1:4])
torch.manual_seed(0)
x = torch.rand(n, d)  # post-ReLU-like scale; the values do not matter for memory
init = (torch.full((k,), 1.0 / k), x[:k].clone(), torch.full((k, d), 0.1))
before = peak_resident_bytes()
started = time.perf_counter()
gmm = fit_diagonal_gmm(x, k, init=init, max_iter=1, tol=0.0)
seconds = time.perf_counter() - started
after = peak_resident_bytes()
print(json.dumps({"x_bytes": x.numel() * 4, "peak_before_em": before, "peak_after_em": after,
                  "em_added_bytes": after - before, "n_by_k_bytes": n * k * 4,
                  "chunk_size": DEFAULT_CHUNK_SIZE, "seconds_one_iteration": seconds,
                  "lower_bound": gmm.lower_bound, "threads": torch.get_num_threads()}))
"""


@pytest.mark.parametrize("n, d, k", CASES)
def test_one_em_iteration_never_holds_an_n_by_k_matrix(benchmark, n, d, k):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(d), str(k)],
                          capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    benchmark.extra_info.update(measured)
    # What chunking needs: a few chunk x max(D, K) float32 blocks and the K x D sums (~100 MB at
    # the largest case); an N x K matrix would add n_by_k_bytes on top.
    assert measured["em_added_bytes"] < measured["n_by_k_bytes"] / 4, measured
    if n > 1_000_000:
        assert measured["peak_after_em"] < 24 * 2**30, "the issue's bound: 24 GiB of CPU memory"
    benchmark.pedantic(lambda: None, rounds=1)  # the measurement above is the benchmark; record it
