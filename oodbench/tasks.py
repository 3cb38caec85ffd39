"""The tasks of a run: top-level functions of picklable arguments, so any executor can run them.

Per seed, with a store: ``classifier`` (train or load it), ``extract`` (the outputs every
detector shares, one task per image set), ``attack`` (one per attack and eps: the adversarial
images and their outputs), ``sources`` (read all of that back, carve the failure sources),
then per detector either ``fit`` (fit once, store the fitted state) and one ``evaluate`` per
failure source (load the fit, tune on the source's holdout, score, metrics: one row), or,
for a detector that cannot store its fit, one ``detector`` task doing all of it. Without a
store (``--no-cache``) nothing could be handed over, so a seed is one ``sources`` task
preparing everything and one ``detector`` task per detector.

Each task rebuilds what it needs from the job (the registry, the benchmark, the options) and
reads what an earlier task computed from the store, so it can run in this process, in a
worker process or on another machine with the same packages installed. A task that warms
the store (``extract``, ``attack``) and meets a plugin's error reports it and returns: the
``sources`` task then records the failed source, and only its rows say so.

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
from .runner import ID_SPLITS, PLUGIN_FAILURES, DetectorSpec, RunOptions, SeedWork
from .runner import _describe as describe


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
    """Start the shared handle's pass counters at zero, so a task reports only its own passes (the classifier
    outlives tasks: an earlier task of this worker may have counted on it)."""
    if work.has_classifier:
        work.classifier()[0].reset_counters()


def classifier_seed(job: Job, seed: int) -> TaskResult:
    """Task ``classifier``: train the seed's classifier (or load its weights) into the store."""
    work = _seed_work(job, seed)
    accounting = _Accounting(work)
    handle = work.classifier()[0]
    handle.reset_counters()
    return accounting.result(TaskResult(), handle)


def extract_seed(job: Job, seed: int, image_set: str, *_dependencies: Any) -> TaskResult:
    """Task ``extract``: the shared outputs of one image set (``train``, ``val``, ``test``, or one a failure
    source asked a dataset for, such as ``ood:<name>``)."""
    work = _seed_work(job, seed)
    handle, model_key = work.classifier()[:2]
    _fresh_counters(work)
    accounting = _Accounting(work)
    try:
        if image_set not in ID_SPLITS:
            work.requested_outputs(handle, model_key, work.requests()[image_set])
        else:
            images = work.id_split(image_set)
            work.outputs(handle, model_key, images, image_set, images.y if image_set != "test" else None)
    except PLUGIN_FAILURES as exc:  # the sources task meets it again and turns it into the source's error rows
        return accounting.result(TaskResult(meta={"error": describe(exc)}), handle)
    return accounting.result(TaskResult(), handle)


def attack_seed(job: Job, seed: int, image_set: str, *_dependencies: Any) -> TaskResult:
    """Task ``attack``: an attacked image set a failure source asked for (``adv:<attack>:<eps>``): the attack
    on the clean test images, and the outputs of the adversarial images."""
    work = _seed_work(job, seed)
    handle, model_key = work.classifier()[:2]
    _fresh_counters(work)
    accounting = _Accounting(work)
    try:
        work.requested_outputs(handle, model_key, work.requests()[image_set])
    except PLUGIN_FAILURES as exc:
        return accounting.result(TaskResult(meta={"error": describe(exc)}), handle)
    return accounting.result(TaskResult(), handle)


def prepare_seed(job: Job, seed: int, *_dependencies: Any) -> TaskResult:
    """Task ``sources``: classifier, shared outputs, attacks (from the store, where earlier tasks put them)
    and the failure sources of one seed."""
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

    ``prepared`` (the seed's sources result) is not read: it makes the order explicit to executors.
    """
    return _rows(job, seed, spec)


def fit_seed(job: Job, seed: int, spec: DetectorSpec, prepared: TaskResult | None = None) -> TaskResult:
    """Task ``fit``: fit one detector on one seed and store its fitted state (or find it stored)."""
    work = _seed_work(job, seed)
    work.prepare()  # read back from the store when another worker prepared this seed
    _fresh_counters(work)
    accounting = _Accounting(work)
    report = work.fit_detector(spec)
    meta = {"fit": report, "detector_metadata": {spec.label: report["metadata"] if not report["error"]
                                                 else {"error": report["error"]}}}
    return accounting.result(TaskResult(meta=meta), work.prepare().handle)


def evaluate_seed(job: Job, seed: int, spec: DetectorSpec, source: str, first: bool, fit: TaskResult) -> TaskResult:
    """Task ``evaluate``: one (detector, source, seed) row from the stored fit: tune on the source's holdout
    if the detector tunes, score, metrics. ``first``: the detector's first source, whose row carries the
    traceback of a failed fit (once per detector and seed, as a ``detector`` task reports it)."""
    report = dict(fit.meta["fit"])
    if not first:
        report["traceback"] = None
    return _rows(job, seed, spec, source, report)


def _rows(job: Job, seed: int, spec: DetectorSpec, source: str | None = None,
          fit_report: dict[str, Any] | None = None) -> TaskResult:
    work = _seed_work(job, seed)
    work.prepare()  # read back from the store when another worker prepared this seed
    _fresh_counters(work)
    accounting = _Accounting(work)
    work.scores.clear()
    work.detector_metadata.clear()
    rows, timings = work.detector_rows(spec, source, fit_report)
    result = TaskResult(rows=rows, timings=timings, scores=dict(work.scores),
                        meta={"detector_metadata": dict(work.detector_metadata)})
    return accounting.result(result, work.prepare().handle)
