"""The default benchmark under the ``local`` and ``dask`` executors: wall time, speed-up, driver overhead.

Full mode (issue text: "3 seeds and all detectors under ``local`` and under ``dask`` with 2
workers on this 2-core machine"): the offline default benchmark (``digits``), seeds 0, 1, 2,
every installed detector, run in this one process one executor after the other:

* ``local``: one worker process, tasks one after another, torch threads = 2;
* ``dask``: a LocalCluster of 2 worker processes, one torch thread each;
* ``inline``: every task in this process (torch threads = 2), for reference.

Each executor starts from an EMPTY store of its own (a fresh temporary folder), so every
executor computes everything: no executor reads what another stored. (The digits network's
weights ship with oodbench, so "everything" is loading them, extracting the shared outputs,
the attacks, and fitting, tuning and scoring every detector; nothing is trained.)

Per executor the JSON has the wall seconds of ``run_benchmark``, the sum of the tasks' own
seconds (as each task timed itself on its worker), those seconds per task kind, and the
driver's overhead per task:

* sequential executors (``local``, ``inline``): (wall - sum of task seconds) / tasks;
* ``dask``: (wall - sum of task seconds / workers) / tasks, an UPPER BOUND: sum / workers is
  the least the work could take on that many workers, while dependencies (a seed's detector
  tasks wait for its sources task, which waits for its extract and attack tasks) and uneven
  task lengths make the real critical work longer.
  The tighter bound with the plan's longest chain, max(sum / workers, chain), is given too.

Overheads include what a task does outside its own timer: starting workers (the local
executor's fork server, Dask's LocalCluster), shipping tasks and their results (rows and
scores), and, on a Dask worker that did not prepare a seed, reading that seed's outputs back
from the store before the task's timer starts.

The results CSV (``csv_text(results_frame(rows))``) of every executor is compared with the
first one's; the JSON records whether each is identical. No assertion on time.

    python benchmarks/executors.py            # full: on an idle machine; writes benchmarks/results/executors.json
    python benchmarks/executors.py --quick    # writes benchmarks/results/executors-quick.json

Quick mode (the test suite's): one seed, msp and gmm, ``local`` and ``dask``, a cut-down
benchmark (one OOD set, one eps per attack).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

from oodbench.benchmark import Benchmark, load_benchmark
from oodbench.cli import parse_detectors
from oodbench.leaderboard import csv_text, results_frame
from oodbench.plugins import Registry, build_registry
from oodbench.provenance import environment
from oodbench.runner import RunOptions, run_benchmark

#: label -> (executor, workers, torch threads per task). "dask" is a 2-core machine's natural setting (one thread per
#: worker); "local-1" runs the same tasks with the same one thread each, so its rows must equal dask's byte for byte,
#: while "local" (2 threads) differs in the last bits where a fit's rounding depends on the thread count.
#: "dask-2x2" (2 workers x 2 threads on 2 cores) oversubscribes: kept to measure it, not run by default.
EXECUTORS: dict[str, tuple[str, int, int]] = {"local": ("local", 1, 2), "dask": ("dask", 2, 1),
                                              "local-1": ("local", 1, 1), "dask-2x2": ("dask", 2, 2),
                                              "inline": ("inline", 1, 2)}
SEQUENTIAL = {"local", "inline"}
RESULTS = Path(__file__).resolve().parent / "results"
FULL = {"benchmark": "digits", "seeds": [0, 1, 2], "detectors": "all", "executors": ["local", "dask", "local-1"]}
QUICK = {"benchmark": "digits", "seeds": [0], "detectors": "msp,gmm", "executors": ["local-1", "dask"]}


def small(bench: Benchmark) -> Benchmark:
    """The quick mode's benchmark: the first OOD set and the middle eps of each attack."""
    return replace(bench, ood=bench.ood[:1], attacks=tuple(replace(a, eps=a.eps[len(a.eps) // 2:][:1])
                                                           for a in bench.attacks))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """This process's torch threads (the inline executor runs its tasks here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: the task kinds that make a seed's data (classifier, shared outputs, attacks, sources) and those of the detectors
DATA_KINDS = ("classifier", "extract", "attack", "sources")
DETECTOR_KINDS = ("fit", "evaluate", "detector")


def longest_chain(per_task: list[dict[str, Any]]) -> float:
    """Seconds of the plan's longest dependency chain, per seed: the classifier, the slowest extract or attack,
    the sources, then the slowest detector (its fit and its slowest evaluate, or its one detector task)."""
    chain: dict[str, dict[str, Any]] = defaultdict(lambda: {"classifier": 0.0, "warm": 0.0, "sources": 0.0,
                                                            "fit": defaultdict(float), "rows": defaultdict(float)})
    for task in per_task:
        seed = chain[task["label"].rsplit(" seed ", 1)[1]]
        kind, seconds = task["kind"], task["seconds"]
        if kind in ("classifier", "sources"):
            seed[kind] += seconds
        elif kind in ("extract", "attack"):
            seed["warm"] = max(seed["warm"], seconds)
        elif kind == "fit":
            seed["fit"][task["detector"]] += seconds
        else:  # evaluate (one source) or detector (every source)
            seed["rows"][task["detector"]] = max(seed["rows"][task["detector"]], seconds)
    return max((s["classifier"] + s["warm"] + s["sources"]
                + max((s["fit"][d] + s["rows"][d] for d in {*s["fit"], *s["rows"]}), default=0.0)
                for s in chain.values()), default=0.0)


def measure(name: str, bench: Benchmark, registry: Registry, detectors: str, seeds: list[int]) -> tuple[dict, str]:
    """Run ``bench`` under executor ``name`` from an empty store of its own: its figures and its results CSV."""
    executor, workers, threads = EXECUTORS[name]
    with tempfile.TemporaryDirectory(prefix=f"oodbench-executors-{name}-") as store:
        opts = RunOptions(benchmark=bench, detectors=parse_detectors(detectors), seeds=list(seeds),
                          cache_dir=Path(store), data_dir=Path("."), device=torch.device("cpu"), progress=False,
                          executor=executor, workers=workers, threads=threads)
        load_before = os.getloadavg()[0]
        with torch_threads(threads) if executor == "inline" else contextlib.nullcontext():
            started = time.perf_counter()
            result = run_benchmark(opts, registry)
            outside = time.perf_counter() - started
        load_after = os.getloadavg()[0]
    per_task = result.meta["executor"]["per_task"]
    wall = result.meta["wall_seconds"]
    n = len(per_task)
    task_seconds = sum(t["seconds"] for t in per_task)
    per_kind: dict[str, dict[str, float]] = {}
    for task in per_task:
        kind = per_kind.setdefault(task["kind"], {"tasks": 0, "seconds": 0.0})
        kind["tasks"] += 1
        kind["seconds"] += task["seconds"]
    chain = longest_chain(per_task)
    if executor in SEQUENTIAL:
        critical, tighter, bound = task_seconds, task_seconds, "exact"
    else:
        critical, tighter, bound = task_seconds / workers, max(task_seconds / workers, chain), "upper bound"
    text = csv_text(results_frame(result.rows))
    record = {
        "executor": executor, "label": name, "workers": workers, "torch_threads_per_worker": threads,
        "tasks": n, "tasks_per_kind": result.meta["executor"]["tasks"],
        "wall_seconds": wall, "run_benchmark_seconds": outside,
        "task_seconds": task_seconds, "task_seconds_per_kind": per_kind,
        "longest_chain_seconds": chain,
        "critical_work_seconds": critical,
        "driver_overhead_per_task_seconds": (wall - critical) / n if n else 0.0,
        "driver_overhead_is": bound,
        "driver_overhead_per_task_seconds_with_chain": (wall - tighter) / n if n else 0.0,
        "workers_seen": sorted({t["worker"] for t in per_task}),
        "failed_tasks": [t["label"] for t in per_task if t["status"] != "ok"],
        "rows": len(result.rows),
        "results_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "cache": {k: result.meta["cache"][k] for k in ("hits", "misses")},
        "load_average_before": load_before, "load_average_after": load_after,
        "per_task": per_task,
    }
    return record, text


def _largest_difference(text: str, reference: str) -> float:
    """The largest |difference| of any metric between two results CSVs (0.0 when identical)."""
    import io

    import pandas as pd

    keys = ["detector", "source", "seed"]
    a, b = (pd.read_csv(io.StringIO(t)).set_index(keys).sort_index() for t in (text, reference))
    metrics = [c for c in ("auroc", "aupr_in", "aupr_out", "fpr_at_95tpr", "detection_error") if c in a.columns]
    return float((a[metrics] - b[metrics]).abs().max().max())


def measure_all(bench: Benchmark, registry: Registry, detectors: str, seeds: list[int],
                executors: list[str]) -> dict[str, Any]:
    runs, texts = {}, {}
    for name in executors:
        runs[name], texts[name] = measure(name, bench, registry, detectors, seeds)
        print(f"{name}: {runs[name]['wall_seconds']:.1f} s", file=sys.stderr, flush=True)
    # Byte-identity is promised at equal threads: compare with the sequential run of dask's thread count.
    reference = "local-1" if "local-1" in executors else executors[0]
    identical = {name: texts[name] == texts[reference] for name in executors}
    largest_difference = {name: _largest_difference(texts[name], texts[reference]) for name in executors}
    base = "local" if "local" in runs else reference
    speed_up = {f"{name}_over_{base}": runs[base]["wall_seconds"] / runs[name]["wall_seconds"]
                for name in runs if name.startswith("dask") and runs[name]["wall_seconds"]}
    return {
        "benchmark": {"name": bench.name, "sha256": bench.sha256, "ood": [o.name for o in bench.ood],
                      "attacks": [{"plugin": a.plugin, "eps": list(a.eps)} for a in bench.attacks]},
        "seeds": list(seeds), "detectors": [s.label for s in parse_detectors(detectors)],
        "store": "each executor starts from an empty store of its own (a fresh temporary folder): all is computed",
        "driver_overhead": "sequential executors: (wall - sum of task seconds) / tasks; dask: (wall - sum of task "
                           "seconds / workers) / tasks, an upper bound (dependencies and uneven tasks make the real "
                           "critical work longer than sum / workers); '_with_chain' uses max(sum / workers, longest "
                           "chain), a tighter upper bound. Includes starting workers, shipping tasks and results, and "
                           "a Dask worker's reading back a seed another worker prepared.",
        "executors": runs,
        "speed_up": speed_up,
        "results_reference": reference,
        "results_identical": identical,
        "largest_metric_difference": largest_difference,
        "all_results_identical": all(identical.values()),
        "cpu_count": os.cpu_count(),
        "environment": environment(),
    }


def table(report: dict[str, Any]) -> str:
    lines = ["| executor | workers x threads | tasks | wall s | sum of task s | data s | detector s "
             "| overhead / task s | results identical |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, run in report["executors"].items():
        kinds = run["task_seconds_per_kind"]
        bound = "" if run["driver_overhead_is"] == "exact" else " (upper bound)"
        lines.append(f"| {name} | {run['workers']} x {run['torch_threads_per_worker']} | {run['tasks']} "
                     f"| {run['wall_seconds']:.1f} | {run['task_seconds']:.1f} "
                     f"| {sum(kinds.get(k, {}).get('seconds', 0) for k in DATA_KINDS):.1f} "
                     f"| {sum(kinds.get(k, {}).get('seconds', 0) for k in DETECTOR_KINDS):.1f} "
                     f"| {run['driver_overhead_per_task_seconds']:.2f}{bound} "
                     f"| {'yes' if report['results_identical'][name] else 'NO'} |")
    for name, ratio in report["speed_up"].items():
        lines.append(f"\nspeed-up, {name.replace('_', ' ')}: {ratio:.2f}x")
    for name, difference in report["largest_metric_difference"].items():
        lines.append(f"largest metric difference, {name} vs {report['results_reference']}: {difference:.2g}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", default=os.environ.get("OODBENCH_BENCH_QUICK") == "1",
                        help="one seed, msp and gmm, local and dask, a cut-down benchmark (OODBENCH_BENCH_QUICK=1)")
    parser.add_argument("--out", help="JSON file to write (default benchmarks/results/executors.json, "
                                      "executors-quick.json in quick mode)")
    parser.add_argument("--benchmark", help="registered benchmark (default digits)")
    parser.add_argument("--seeds", help="comma-separated seeds (override)")
    parser.add_argument("--detectors", help="detectors, as oodbench run -d takes them (override; default all)")
    parser.add_argument("--executors", help="comma-separated among local, dask, inline (override)")
    args = parser.parse_args(argv)
    mode = dict(QUICK if args.quick else FULL)
    registry = build_registry(strict=True)
    bench = load_benchmark(registry.get("benchmarks", args.benchmark or mode["benchmark"]).target)
    if args.quick:
        bench = small(bench)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else mode["seeds"]
    detectors = args.detectors or mode["detectors"]
    if detectors == "all":
        detectors = ",".join(registry.names("detectors"))  # every installed one, as oodbench run without -d
    executors = args.executors.split(",") if args.executors else mode["executors"]
    unknown = set(executors) - EXECUTORS.keys()
    if unknown:
        parser.error(f"unknown executors {sorted(unknown)}; choose among {', '.join(EXECUTORS)}")
    out = Path(args.out or RESULTS / ("executors-quick.json" if args.quick else "executors.json"))
    report = {"mode": "quick" if args.quick else "full", **measure_all(bench, registry, detectors, seeds, executors)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
