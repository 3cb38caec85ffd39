"""A run planned before anything is loaded: benchmark + detectors + seeds -> tasks with keys and dependencies.

Per seed one ``prepare`` task (classifier, shared outputs, attacks, sources) and, after it,
one ``detector`` task per detector; the driver collects their results in plan order, so the
rows come out the same whatever ran them, in whichever order. A task's key is a hash of the
job's configuration and the task's own part of it, readable in logs and stable across runs.
Resources say what a task needs of a worker: every task of a run on a GPU asks for one (the
detector tasks fit on the run's device too), so Dask places them on GPU workers.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .cache import Cache, make_key
from .plugins import resolve_options
from .tasks import Job, detector_seed, prepare_seed


@dataclass(frozen=True)
class Task:
    kind: str  # prepare | detector
    key: str
    label: str  # for people: "prepare seed 0", "gmm seed 0"
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    #: keys of the tasks whose results are appended to ``args`` when this one runs
    deps: tuple[str, ...] = ()
    resources: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    detector: str | None = None


def make_plan(job: Job) -> list[Task]:
    """The run's tasks in an order where every task comes after its dependencies."""
    opts, registry = job.options, job.registry
    resources = {"GPU": 1.0} if opts.device.type == "cuda" else {}
    bench = opts.benchmark
    # What the shared outputs depend on, known before any data is read: the benchmark file (its sha256 covers
    # every option), the plugins' versions, the options that change numerics, and whether layers ride along.
    used = {("datasets", bench.in_distribution.plugin), ("models", bench.model.plugin),
            *(("datasets", ref.dataset) for ref in bench.ood), *(("attacks", ref.plugin) for ref in bench.attacks)}
    versions = {f"{kind}:{name}": registry.get(kind, name).version for kind, name in sorted(used)}
    layers = any("layers" in registry.get("detectors", s.name).target.needs for s in opts.detectors)
    shared = make_key("prepare", benchmark=bench.sha256, versions=versions, data=str(Path(opts.data_dir).absolute()),
                      device=opts.device.type, batch=opts.batch_size, bf16=opts.bf16,
                      channels_last=opts.channels_last, layers=layers)
    tasks = []
    for seed in opts.seeds:
        prepare = Task("prepare", f"{make_key('prepare', shared=shared, seed=seed)}-seed{seed}",
                       f"prepare seed {seed}", prepare_seed, (job, seed), (), resources, seed)
        tasks.append(prepare)
        for spec in opts.detectors:
            entry = registry.get("detectors", spec.name)
            key = make_key("detector", prepare=prepare.key, name=spec.name, version=entry.version,
                           options=resolve_options(entry, spec.options, seed=seed))
            tasks.append(Task("detector", f"{key}-{_safe(spec.label)}-seed{seed}", f"{spec.label} seed {seed}",
                              detector_seed, (job, seed, spec), (prepare.key,), resources, seed, spec.label))
    return tasks


def in_store(tasks: list[Task], cache: Cache) -> list[bool]:
    """Whether each task finished before with this configuration (its record is in the store).

    A finished task is run again all the same, and then reads its outputs from the store
    instead of computing them: records say what a run will find, the outputs' own keys decide.
    """
    return [cache.path_of(_record_key(t), ".npz") is not None for t in tasks]


def record_finished(task: Task, cache: Cache, seconds: float) -> None:
    """Leave the record ``in_store`` looks for."""
    cache.arrays(_record_key(task), lambda: {"seconds": np.array(seconds)})


def _record_key(task: Task) -> str:
    return f"task-{task.key.split('-', 2)[1]}"


def summary(tasks: list[Task]) -> dict[str, int]:
    """Tasks per kind, in the order kinds first appear."""
    return dict(Counter(t.kind for t in tasks))


def _safe(label: str) -> str:
    # Dask keys and log lines: keep the label readable but free of brackets, commas and spaces.
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)
