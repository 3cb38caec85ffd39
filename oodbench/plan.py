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
from dataclasses import dataclass, field
from typing import Any, Callable

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
    opts = job.options
    resources = {"GPU": 1.0} if opts.device.type == "cuda" else {}
    tasks = []
    for seed in opts.seeds:
        prepare = Task("prepare", f"prepare-seed{seed}-{job.identity[4:16]}", f"prepare seed {seed}",
                       prepare_seed, (job, seed), (), resources, seed)
        tasks.append(prepare)
        for spec in opts.detectors:
            tasks.append(Task("detector", f"detector-{_safe(spec.label)}-seed{seed}-{job.identity[4:16]}",
                              f"{spec.label} seed {seed}", detector_seed, (job, seed, spec), (prepare.key,),
                              resources, seed, spec.label))
    return tasks


def summary(tasks: list[Task]) -> dict[str, int]:
    """Tasks per kind, in the order kinds first appear."""
    return dict(Counter(t.kind for t in tasks))


def _safe(label: str) -> str:
    # Dask keys and log lines: keep the label readable but free of brackets, commas and spaces.
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in label)
