"""The tasks of a run: top-level functions of picklable arguments, so any executor can run them.

A run is, per seed, one ``prepare`` task (train or load the classifier, extract the outputs
every detector shares, run the attacks, carve the failure sources) and one ``detector`` task
per detector (fit, tune, score every source, compute the metrics). Each task rebuilds what
it needs from the job (the registry, the benchmark, the options) and reads what an earlier
task computed from the store, so it can run in this process, in a worker process or on
another machine with the same packages installed.

Within one process the prepared seed is kept (the last one only, to bound memory), so the
detector tasks that follow their seed's ``prepare`` on the same worker read nothing twice.
Pass counts, timings and cache statistics travel back with each task's result; the driver
adds them up.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cache import Cache, make_key
from .plugins import Registry
from .progress import Progress
from .runner import DetectorSpec, RunOptions, SeedWork


@dataclass(frozen=True)
class Job:
    """Everything a task needs to rebuild its world: picklable, the same for every task of a run."""

    options: RunOptions
    registry: Registry

    @property
    def identity(self) -> str:
        """What makes two jobs' prepared seeds interchangeable (the memo's key)."""
        o = self.options
        plugins = {kind: {name: [f"{e.target.__module__}.{getattr(e.target, '__qualname__', e.target)}", e.version,
                                 repr(sorted(e.defaults.items()))] for name, e in names.items()}
                   for kind, names in self.registry.entries.items() if kind != "benchmarks"}
        return make_key("job", benchmark=o.benchmark.sha256, path=str(o.benchmark.path), cache=str(o.cache_dir),
                        data=str(o.data_dir), device=str(o.device), batch=o.batch_size, bf16=o.bf16,
                        channels_last=o.channels_last, detectors=sorted(s.name for s in o.detectors), plugins=plugins)


@dataclass
class TaskResult:
    """What a task hands back to the driver: its rows and everything run.json adds up."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    #: the source names, kinds and what their negatives are, in order (a prepare task's; for error rows)
    sources: list[tuple[str, str, str]] = field(default_factory=list)
    #: the fields every row of the seed shares (a prepare task's)
    common: dict[str, Any] = field(default_factory=dict)
    passes: dict[str, dict[str, int]] = field(default_factory=dict)
    throughput: dict[str, dict[str, float]] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    worker: str = ""


# The seed prepared last in this process: (job identity, seed) -> SeedWork.
_PREPARED: dict[tuple[str, int], SeedWork] = {}


def _seed_work(job: Job, seed: int) -> SeedWork:
    key = (job.identity, seed)
    if key not in _PREPARED:
        _PREPARED.clear()  # one seed at a time: a worker's memory holds one seed's data, not all of them
        opts = job.options
        _PREPARED[key] = SeedWork(opts, job.registry, Cache(opts.cache_dir), Progress(enabled=opts.progress), seed)
    return _PREPARED[key]


def forget_prepared() -> None:
    """Drop the prepared seed this process keeps (the driver does at the end of a run)."""
    _PREPARED.clear()


class _Accounting:
    """Counts one task's cache reads and network passes, on objects that outlive the task."""

    def __init__(self, work: SeedWork):
        self.work, self.started = work, time.perf_counter()
        cache = work.cache
        self.hits, self.misses, self.quarantined = cache.hits, cache.misses, len(cache.quarantined)

    def result(self, result: TaskResult, handle) -> TaskResult:
        cache = self.work.cache
        result.cache = {"hits": cache.hits - self.hits, "misses": cache.misses - self.misses,
                        "quarantined": cache.quarantined[self.quarantined:]}
        if handle is not None:
            result.passes = {a: dict(c) for a, c in handle.passes.items()}
            result.throughput = handle.throughput()
        result.seconds = time.perf_counter() - self.started
        result.worker = f"{socket.gethostname()}:{os.getpid()}"
        return result


def _fresh_counters(work: SeedWork) -> None:
    """Start the shared handle's pass counters at zero, so a task reports only its own passes."""
    if work.prepared is not None:
        work.prepared.handle.reset_counters()


def prepare_seed(job: Job, seed: int) -> TaskResult:
    """Task ``prepare``: classifier, shared outputs, attacks and sources of one seed, into the store."""
    work = _seed_work(job, seed)
    _fresh_counters(work)
    accounting = _Accounting(work)
    prepared = work.prepare()
    handle = prepared.handle
    meta = {**prepared.meta,
            "batch_size": {"asked": work.batch_size, "used": dict(handle.batch_sizes), **handle.memory,
                           "halved_after_out_of_memory": handle.memory_backoffs},
            "numerics": {"asked": {"bf16": job.options.bf16, "channels_last": job.options.channels_last},
                         "used": handle.numerics or "fp32", "shared_passes": work.bench.precision}}
    sources = [(s.name, s.kind, s.negatives_are) for s in prepared.sources]
    return accounting.result(TaskResult(meta=meta, sources=sources, common=work.common_fields()), handle)


def detector_seed(job: Job, seed: int, spec: DetectorSpec, prepared: TaskResult | None = None) -> TaskResult:
    """Task ``detector``: fit one detector, score every source of one seed, one row per source.

    ``prepared`` (the seed's prepare result) is not read: it makes the order explicit to executors.
    """
    work = _seed_work(job, seed)
    work.prepare()  # read back from the store when another worker prepared this seed
    _fresh_counters(work)
    accounting = _Accounting(work)
    work.scores.clear()
    work.detector_metadata.clear()
    rows, timings = work.detector_rows(spec)
    result = TaskResult(rows=rows, timings=timings, scores=dict(work.scores),
                        meta={"detector_metadata": dict(work.detector_metadata)})
    return accounting.result(result, work.prepare().handle)
