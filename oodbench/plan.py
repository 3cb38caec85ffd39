"""A run planned before anything is loaded: benchmark + detectors + seeds -> tasks with keys and dependencies.

Per seed, with a store::

    classifier ─┬─► extract train, val, test, ood:<name> ─┐
                └─► attack <plugin> <eps> (+ its outputs) ─┴─► sources ─┬─► fit <detector> ─► evaluate <detector> <source>
                                                                        └─► detector <detector>  (fit cannot be stored)

Without a store (``--no-cache``) tasks could hand nothing over: per seed one ``sources`` task
prepares everything and one ``detector`` task per detector fits and evaluates it. The driver
collects results in plan order, so the rows come out the same whatever ran them, in
whichever order.

A task's key hashes what decides its outputs, known before any data is read: the benchmark
file (its sha256 covers every option), the plugins' versions, the datasets' and the model's
fingerprints (the sha256 of the files they read), the numerics options, the seed and the
task's own part (detector, options, source). Resources say what a task needs of a worker:
every task of a run on a GPU asks for one, so Dask places them on GPU workers.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .cache import Cache, make_key
from .plugins import instantiate, resolve_options
from .runner import ID_SPLITS, image_requests, source_cases, source_plugins
from .tasks import Job, attack_seed, classifier_seed, detector_seed, evaluate_seed, extract_seed, fit_seed, prepare_seed


@dataclass(frozen=True)
class Task:
    kind: str  # classifier | extract | attack | sources | fit | evaluate | detector
    key: str
    label: str  # for people: "extract ood:gaussian seed 0", "gmm on mistakes seed 0"
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    #: keys of the tasks whose results are appended to ``args`` when this one runs
    deps: tuple[str, ...] = ()
    resources: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    detector: str | None = None
    source: str | None = None


def make_plan(job: Job) -> list[Task]:
    """The run's tasks in an order where every task comes after its dependencies."""
    opts, registry = job.options, job.registry
    resources = {"GPU": 1.0} if opts.device.type == "cuda" else {}
    bench = opts.benchmark
    fine = opts.cache_dir is not None
    sources = source_plugins(registry, bench)
    requests = image_requests(sources)
    used = {("datasets", bench.in_distribution.plugin), ("models", bench.model.plugin),
            *(("sources", ref.plugin) for ref in bench.sources),
            *(("attacks", r.attack) if r.attack is not None else ("datasets", r.dataset) for r in requests.values())}
    versions = {f"{kind}:{name}": registry.get(kind, name).version for kind, name in sorted(used)}
    layers = any("layers" in registry.get("detectors", s.name).target.needs for s in opts.detectors)
    data = make_key("data", in_distribution=dataset_fingerprint(job, bench.in_distribution.plugin,
                                                                 bench.in_distribution.options),
                    requested={name: dataset_fingerprint(job, r.dataset, r.options)
                               for name, r in requests.items() if r.attack is None},
                    model=model_fingerprint(job))
    shared = make_key("prepare", benchmark=bench.sha256, versions=versions, data=data, device=opts.device.type,
                      batch=opts.batch_size, bf16=opts.bf16, channels_last=opts.channels_last, layers=layers)
    names = [case.name for _, case in source_cases(sources)]
    tasks: list[Task] = []

    def add(kind: str, part: dict[str, Any], label: str, fn: Callable[..., Any], args: tuple[Any, ...],
            deps: tuple[str, ...], seed: int, tag: str, **extra: Any) -> Task:
        key = f"{make_key(kind, shared=shared, seed=seed, **part)}-{_safe(tag)}-seed{seed}"
        tasks.append(Task(kind, key, label, fn, args, deps, resources, seed, **extra))
        return tasks[-1]

    for seed in opts.seeds:
        warm: tuple[str, ...] = ()
        if fine:
            model = add("classifier", {}, f"classifier seed {seed}", classifier_seed, (job, seed), (), seed,
                        "classifier")
            loaded = [name for name, r in requests.items() if r.attack is None]
            warm = tuple(add("extract", {"set": name}, f"extract {name} seed {seed}", extract_seed,
                             (job, seed, name), (model.key,), seed, f"extract-{name}").key
                         for name in (*ID_SPLITS, *loaded))
            warm += tuple(add("attack", {"set": name}, f"attack {r.attack} eps={r.eps:g} seed {seed}", attack_seed,
                              (job, seed, name), (model.key,), seed, f"attack-{r.attack}-{r.eps:g}").key
                          for name, r in requests.items() if r.attack is not None)
        sources = add("sources", {}, f"sources seed {seed}", prepare_seed, (job, seed), warm, seed, "sources")
        for spec in opts.detectors:
            entry = registry.get("detectors", spec.name)
            part = {"name": spec.name, "version": entry.version,
                    "options": resolve_options(entry, spec.options, seed=seed)}
            if not (fine and entry.target.stores_state()):
                add("detector", part, f"{spec.label} seed {seed}", detector_seed, (job, seed, spec), (sources.key,),
                    seed, spec.label, detector=spec.label)
                continue
            fit = add("fit", part, f"fit {spec.label} seed {seed}", fit_seed, (job, seed, spec), (sources.key,), seed,
                      f"fit-{spec.label}", detector=spec.label)
            for i, name in enumerate(names):
                add("evaluate", {**part, "source": name}, f"{spec.label} on {name} seed {seed}", evaluate_seed,
                    (job, seed, spec, name, i == 0), (fit.key,), seed, f"{spec.label}-{name}", detector=spec.label,
                    source=name)
    return tasks


def dataset_fingerprint(job: Job, plugin: str, options: dict[str, Any]) -> str:
    """The dataset plugin's version, resolved options and ``fingerprint`` (the sha256 of its files, or ''
    for images generated from the options and the seed), without loading any image."""
    entry = job.registry.get("datasets", plugin)
    try:
        files = instantiate(entry, options).fingerprint(job.options.data_dir)
    except Exception as exc:  # noqa: BLE001 - unreadable data fails its own load later, with the plugin's message
        files = f"unreadable: {type(exc).__name__}: {exc}"
    return make_key("dataset", plugin=plugin, version=entry.version, options=resolve_options(entry, options),
                    files=files)


def model_fingerprint(job: Job) -> str:
    """The model plugin's ``fingerprint`` (its checkpoint's sha256; '' for one trained from its options)."""
    ref = job.options.benchmark.model
    entry = job.registry.get("models", ref.plugin)
    try:
        model = entry.target(**resolve_options(entry, ref.options))
        model.data_dir = job.options.data_dir
        return model.fingerprint()
    except Exception as exc:  # noqa: BLE001 - a missing checkpoint fails the classifier task, with its message
        return f"unreadable: {type(exc).__name__}: {exc}"


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
