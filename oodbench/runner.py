"""A run: benchmark + detectors + seeds -> one result row per (detector, source, seed).

The run is a chain of keyed tasks; each task's result is cached under a key hashed from
its inputs' keys and its own configuration, so a second run recomputes nothing and an
interrupted run resumes from the last finished task::

    load data ─► train/load classifier ─► extract outputs (per image set) ─┐
                       └──► attack (per attack, eps) ─► extract outputs ───┤
                                               fit detector ─► score (per image set) ─► metrics

Outputs (logits + penultimate features) are extracted once per (classifier, image set)
and shared by every detector; detectors are fitted lazily, only when one of their scores
is not cached yet. A detector that raises, or returns non-finite scores, marks only its
own rows as errors.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .api import (UNLABELED, Case, DatasetContext, Detector, FailureSource, FitContext, Holdout, ImageRequest, ImageSet,
                  PluginError, SourceContext, SplitView)
from .benchmark import Benchmark
from .cache import Cache, make_key
from .classifier import ClassifierHandle
from .labels import keep_labels_per_class
from .leaderboard import SCHEMA_VERSION
from .metrics import compute_all, row_entropy
from .plugins import Entry, Registry, instantiate, resolve_options
from .progress import Progress
from .provenance import environment


@dataclass(frozen=True)
class DetectorSpec:
    """A detector as the user asked for it: ``gmm`` or ``gmm[k=10]``."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Part:
    """Rows ``index`` of a whole image set's outputs: scores are computed on ``parent`` once."""

    parent: SplitView
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    def view(self) -> SplitView:
        return self.parent.subset(self.index)

    def take(self, index: np.ndarray) -> "Part":
        return Part(self.parent, self.index[index])


@dataclass
class Source:
    """One failure source: which inputs are positives and negatives, and the holdout."""

    name: str
    kind: str  # mistakes | ood | adversarial | error
    negatives_are: str  # what the negatives are, in words, for the CSV
    positives: Part
    negatives: Part
    holdout_positives: Part | None = None
    holdout_negatives: Part | None = None
    #: each side's pair ids when the source is made of pairs (``Side.pairs``): the holdout keeps pairs whole
    pairs: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def n_holdout(self) -> int:
        return 0 if self.holdout_positives is None else len(self.holdout_positives) + len(self.holdout_negatives)


@dataclass
class RunOptions:
    benchmark: Benchmark
    detectors: list[DetectorSpec]
    seeds: list[int]
    cache_dir: Path | str | None  # a local folder, an fsspec URL, or None for no store
    data_dir: Path
    device: torch.device
    batch_size: int | None = None
    progress: bool = True
    #: GPU speed options (bf16 autocast, channels-last inputs); ignored on a CPU, whose results stay plain fp32
    bf16: bool = False
    channels_last: bool = False
    #: where tasks run (a registered executor) and its options; see ``oodbench.api.Executor``
    executor: str = "local"
    workers: int | None = None
    scheduler: str | None = None
    task_timeout: float | None = None
    threads: int | None = None


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    timings: list[dict[str, Any]]
    meta: dict[str, Any]
    # (detector, source, seed) -> (positives' scores, negatives' scores) of every ok row, kept so that
    # curves and histograms can be drawn after the run; float64, exactly what the metrics saw.
    scores: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def choose_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PluginError(f"device '{name}' asked for, but torch sees no CUDA device")
    return torch.device(name)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


class SeedWork:
    """Everything one seed of a run computes; the methods are the tasks."""

    def __init__(self, opts: RunOptions, registry: Registry, cache: Cache, progress: Progress, seed: int):
        self.opts, self.registry, self.cache, self.progress, self.seed = opts, registry, cache, progress, seed
        self.bench = opts.benchmark
        self.batch_size = opts.batch_size or self.bench.batch_size
        self._id_sets: dict[str, ImageSet] = {}
        self.scores: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}  # filled by detector_rows
        self.detector_metadata: dict[str, Any] = {}  # filled by detector_rows
        # Intermediate layers are extracted with the rest when any detector of the run reads them.
        self.need_layers = any("layers" in registry.get("detectors", spec.name).target.needs for spec in opts.detectors)
        self._prepared: Prepared | None = None
        self._classifier: tuple[ClassifierHandle, str, Entry, dict[str, Any]] | None = None
        self._ood_sets: dict[str, ImageSet] = {}
        # The detector fitted (or loaded) last in this process, by key: a worker's evaluate tasks of one detector
        # share it as one detector task did, memos included (ODIN's perturbed test images serve every source).
        self._fitted: dict[str, Detector] = {}

    # -- data ------------------------------------------------------------------------
    def _dataset(self, ref_name: str, options: dict[str, Any]):
        entry = self.registry.get("datasets", ref_name)
        return entry, instantiate(entry, options, seed=self.seed)

    def id_split(self, split: str) -> ImageSet:
        if split not in self._id_sets:
            ref = self.bench.in_distribution
            _, dataset = self._dataset(ref.plugin, ref.options)
            images = dataset.load(DatasetContext(split=split, seed=self.seed, data_dir=self.opts.data_dir))
            if images.y is None or images.num_classes is None:
                raise PluginError(f"in-distribution dataset '{ref.plugin}' gave no labels or num_classes for '{split}'")
            if split == "test" and self.bench.test_subset:
                images = images.subset(np.arange(min(self.bench.test_subset, len(images))))
            if split == "train" and self.bench.labels_per_class:
                kept = keep_labels_per_class(images.y, self.bench.labels_per_class, self.seed, f"{ref.plugin} train split")
                images = ImageSet(images.x, kept, images.name, images.num_classes)
            self._id_sets[split] = images
        return self._id_sets[split]

    def ood_set(self, name: str, dataset_name: str, options: dict[str, Any]) -> ImageSet:
        if name not in self._ood_sets:
            self._ood_sets[name] = self._load_ood_set(dataset_name, options)
        return self._ood_sets[name]

    def _load_ood_set(self, dataset_name: str, options: dict[str, Any]) -> ImageSet:
        _, dataset = self._dataset(dataset_name, options)
        test = self.id_split("test")
        ctx = DatasetContext(split="test", seed=self.seed, data_dir=self.opts.data_dir,
                             image_shape=test.image_shape, size=len(test), in_distribution=self.id_split)
        images = dataset.load(ctx)
        if images.image_shape != test.image_shape:
            raise PluginError(f"dataset '{dataset_name}' returned images of shape {images.image_shape}, "
                              f"expected the in-distribution {test.image_shape}")
        return images

    # -- classifier ------------------------------------------------------------------
    def classifier(self) -> tuple[ClassifierHandle, str, Entry, dict[str, Any]]:
        """The seed's classifier (trained, or loaded from the store), its key, plugin entry and options."""
        if self._classifier is None:
            self._classifier = self._load_classifier()
        return self._classifier

    @property
    def has_classifier(self) -> bool:
        """Whether this process has built the seed's classifier already."""
        return self._classifier is not None

    def _load_classifier(self) -> tuple[ClassifierHandle, str, Entry, dict[str, Any]]:
        ref = self.bench.model
        entry = self.registry.get("models", ref.plugin)
        options = resolve_options(entry, ref.options)
        model = entry.target(**options)
        model.data_dir = self.opts.data_dir
        train, val = self.id_split("train"), self.id_split("val")
        if not model.semi_supervised:
            train = _labelled(train)
        fingerprint = model.fingerprint()
        key = make_key("model", plugin=ref.plugin, version=entry.version, options=options, seed=self.seed,
                       train=train.key if model.trainable else None, val=val.key if model.trainable else None,
                       shape=train.image_shape, classes=train.num_classes, fingerprint=fingerprint)

        model.resume_dir = self.cache.scratch_dir(key)

        def train_model() -> dict[str, Any]:
            _seed_everything(self.seed)
            network = model.build(train.image_shape, train.num_classes, self.seed)
            if model.trainable:
                with self.progress.status(f"training {ref.plugin} (seed {self.seed})") as say:
                    model.train(network, train, val, self.seed, self.opts.device, say)
            return {k: v.detach().cpu() for k, v in network.state_dict().items()}

        # Rows say where the weights came from: a network trained here is exact only on the same hardware.
        self.model_weights = "trained" if model.trainable else (f"sha256:{fingerprint[:16]}" if fingerprint else "loaded")
        state = self.cache.state_dict(key, train_model)
        if model.resume_dir is not None:
            shutil.rmtree(model.resume_dir, ignore_errors=True)  # the weights are cached: nothing left to resume
        network = model.build(train.image_shape, train.num_classes, self.seed)
        network.load_state_dict(state)
        on_gpu = self.opts.device.type == "cuda"
        handle = ClassifierHandle(network, self.opts.device, self.batch_size, bf16=self.opts.bf16 and on_gpu,
                                  channels_last=self.opts.channels_last and on_gpu, fit_batch_size=True)
        return handle, key, entry, options

    def outputs(self, handle: ClassifierHandle, model_key: str, images: ImageSet, activity: str,
                labels: np.ndarray | None = None) -> SplitView:
        # Intermediate layers ride along in the same pass, only when a detector of the run reads them.
        # Logits and features are the same either way, so the view's key (which detector scores are
        # cached under) does not depend on it, and a run without layer detectors reads an entry
        # that one with them stored.
        numerics = self._numerics(handle)
        key = make_key("outputs", model=model_key, images=images.key, **numerics)
        with_layers = make_key("outputs", model=model_key, images=images.key, layers=True, **numerics)
        layers = self.need_layers and handle.has_layers
        stored = with_layers if layers or self.cache.path_of(with_layers, ".npz") else key
        layers_in_store = stored == with_layers

        def extract() -> dict[str, np.ndarray]:
            chunks = []
            with handle.activity(f"extract:{activity}"), self._shared_precision(handle):
                for batch in self.progress.iterate(images.batches(self.batch_size * 4), f"features {activity}",
                                                   total=math.ceil(len(images) / (self.batch_size * 4))):
                    chunks.append(handle.outputs_and_layers(batch, layers_in_store))
            arrays = {"logits": np.concatenate([c[0].numpy() for c in chunks]),
                      "features": np.concatenate([c[1].numpy() for c in chunks])}
            for i in range(len(chunks[0][2]) if chunks else 0):
                arrays[f"layer{i}"] = np.concatenate([c[2][i].numpy() for c in chunks])
            return arrays

        arrays = self.cache.arrays(stored, extract)
        maps = [arrays[f"layer{i}"] for i in range(sum(k.startswith("layer") for k in arrays))] if layers else None
        return SplitView(activity, arrays["logits"], arrays["features"], images, labels, key=key, layers=maps)

    def adversarial(self, handle: ClassifierHandle, model_key: str, clean: ImageSet, attack_name: str,
                    options: dict[str, Any], eps: float) -> ImageSet:
        entry = self.registry.get("attacks", attack_name)
        resolved = resolve_options(entry, options, seed=self.seed)
        attack = entry.target(**resolved)
        numerics = self._numerics(handle)
        key = make_key("attack", model=model_key, images=clean.key, attack=attack_name, version=entry.version,
                       options=resolved, eps=eps, seed=self.seed, **numerics)

        def run_attack() -> dict[str, np.ndarray]:
            generator = torch.Generator().manual_seed(self.seed)
            labels = torch.tensor(clean.y)
            chunks = []
            step = self.batch_size * 4
            with handle.activity(f"attack:{attack_name}:{eps:g}"), self._shared_precision(handle):
                for start in self.progress.iterate(range(0, len(clean), step), f"{attack_name} eps={eps:g}",
                                                   total=math.ceil(len(clean) / step)):
                    x = clean.tensor(slice(start, start + step))
                    adv = attack.perturb(handle, x, labels[start:start + step], eps, generator)
                    chunks.append(adv.detach().float().cpu().numpy())
            return {"x": np.concatenate(chunks).astype(np.float32)}

        x = self.cache.arrays(key, run_attack)["x"]
        return ImageSet(x, None, f"{attack_name}-{eps:g}")

    def _numerics(self, handle: ClassifierHandle) -> dict[str, str]:
        """What makes shared outputs differ from plain fp32 in their last bits, for their cache keys."""
        numerics = {"numerics": handle.numerics} if handle.numerics else {}
        return {**numerics, "precision": "float64"} if self.bench.precision == "float64" else numerics

    def _shared_precision(self, handle: ClassifierHandle):
        """The benchmark's precision for the passes every detector shares (extraction, attacks)."""
        return handle.float64() if self.bench.precision == "float64" else contextlib.nullcontext()

    # -- sources -----------------------------------------------------------------------
    def source_plugins(self) -> list[FailureSource]:
        """The benchmark's failure-source plugin instances, in row order."""
        return source_plugins(self.registry, self.bench, self.seed)

    def requests(self) -> dict[str, ImageRequest]:
        """Every image set the sources need, by name, in the order they first ask for it."""
        return image_requests(self.source_plugins())

    def requested_outputs(self, handle: ClassifierHandle, model_key: str,
                          request: ImageRequest) -> tuple[SplitView, np.ndarray | None]:
        """Make a requested image set (load it, or attack the clean subset) and extract its outputs (cached);
        with its labels when the dataset keeps them (for ``carve``; detectors never see them)."""
        if request.attack is not None:
            images = self.adversarial(handle, model_key, self.clean_attack_set(), request.attack, request.options,
                                      request.eps)
        else:
            images = self.ood_set(request.name, request.dataset, request.options)
        return self.outputs(handle, model_key, images, request.name), images.y

    def sources(self, handle: ClassifierHandle, model_key: str) -> tuple[SplitView, list[Source]]:
        """Every failure source, carved by its plugin from the outputs of the image sets it named.

        An image set that cannot be made (a dataset's or an attack's error) fails the sources that
        use it, and only those; so does a plugin's ``carve`` that raises."""
        test_set = self.id_split("test")
        test = self.outputs(handle, model_key, test_set, "test")
        views, labels, failed = {"test": test}, {"test": test_set.y}, {}
        for name, request in self.requests().items():
            try:
                views[name], labels[name] = self.requested_outputs(handle, model_key, request)
            except Exception as exc:
                failed[name] = exc
        ctx = SourceContext(self.seed, {name: view.predictions for name, view in views.items()}, labels,
                            self._attack_subset())
        sources: list[Source] = []
        for plugin, case in source_cases(self.source_plugins()):
            kind = case.kind or plugin.kind
            broken = [failed[name] for name in case.uses if name in failed]
            try:
                if broken:
                    raise broken[0]
                positives, negatives = plugin.carve(case, ctx)
                source = Source(case.name, kind, case.negatives_are,
                                Part(views[positives.images], np.asarray(positives.index, np.int64)),
                                Part(views[negatives.images], np.asarray(negatives.index, np.int64)))
                if positives.pairs is not None and negatives.pairs is not None:
                    source.pairs = (np.asarray(positives.pairs, np.int64), np.asarray(negatives.pairs, np.int64))
            except Exception as exc:
                source = _failed_source(case.name, kind, exc)
            sources.append(source)
        for source in sources:
            if source.kind != "error":
                self._carve_holdout(source)
        return test, sources

    def _attack_subset(self) -> np.ndarray:
        test_set = self.id_split("test")
        return np.arange(min(self.bench.attack_subset or len(test_set), len(test_set)))

    def clean_attack_set(self) -> ImageSet:
        """The clean test images the attacks perturb (the first ``attack_subset`` of the test split)."""
        return self.id_split("test").subset(self._attack_subset())

    def _carve_holdout(self, source: Source) -> None:
        """Move a seeded random part of each side into a holdout that no row evaluates on.

        The holdout keeps its random order, so a detector that splits it in two (the Mahalanobis
        ensemble fits on one half and picks eps on the other) gets two random halves even of a
        class-sorted test set; the evaluated rest is sorted. A source of pairs holds out whole
        pairs, chosen among the positives: a clean image and its adversarial (or corrupted) version
        are both tuned on or both evaluated, never split between the two.
        """
        rng = np.random.default_rng([self.seed, *source.name.encode()])
        positives, negatives = source.positives, source.negatives
        if source.pairs is None:
            split = []
            for part in (positives, negatives):
                n = min(self.bench.holdout_size, int(self.bench.holdout_fraction * len(part)))
                order = rng.permutation(len(part))
                split.append((part.take(order[:n]), part.take(np.sort(order[n:]))))
        else:
            n = min(self.bench.holdout_size, int(self.bench.holdout_fraction * len(positives)))
            order = rng.permutation(len(positives))
            held_pairs = source.pairs[0][order[:n]]  # in their random order
            rank = dict(zip(held_pairs.tolist(), range(n)))
            negative_ids = source.pairs[1].tolist()
            held = sorted((i for i, pair in enumerate(negative_ids) if pair in rank), key=lambda i: rank[negative_ids[i]])
            held_negatives = np.asarray(held, np.int64)
            split = [(positives.take(order[:n]), positives.take(np.sort(order[n:]))),
                     (negatives.take(held_negatives),
                      negatives.take(np.setdiff1d(np.arange(len(negatives)), held_negatives)))]
        (source.holdout_positives, source.positives), (source.holdout_negatives, source.negatives) = split

    # -- detectors ---------------------------------------------------------------------
    def _fitting(self, spec: DetectorSpec, fit_report: dict[str, Any] | None = None) -> "_Fitting":
        """How ``spec`` is fitted on this seed: ``fitted()`` builds (or loads) the detector once.

        ``fit_report``: what an earlier ``fit`` task saw; a fit that failed there is not tried again."""
        prepared = self.prepare()
        handle, model_key, train, train_labelled, val, sources = (prepared.handle, prepared.model_key, prepared.train,
                                                                  prepared.train_labelled, prepared.val, prepared.sources)
        entry = self.registry.get("detectors", spec.name)
        resolved = resolve_options(entry, spec.options, seed=self.seed)
        cls = entry.target
        # The class and its resolved options, not the registered name, decide the fit and the scores: two names
        # for one configuration (gmm and gmm-100, logits and maxlogit) share one fit and one scoring.
        det_key = make_key("detector", implementation=f"{cls.__module__}.{cls.__qualname__}", version=entry.version,
                           options=resolved, model=model_key, train=train.key, val=val.key, seed=self.seed)
        needs = frozenset(cls.needs) | {"logits"}
        # fit_traceback: the constructor's or fit's, recorded once (on the first row it fails) for run.json
        state: dict[str, Any] = {"detector": None, "fit_error": None, "fit_seconds": 0.0, "fit_traceback": None}
        if fit_report is not None:
            state["fit_seconds"] = fit_report["seconds"]
            if fit_report["error"]:
                state["fit_error"], state["fit_traceback"] = _FitFailed(fit_report["error"]), fit_report["traceback"]

        def fitted() -> Detector:
            """The fitted detector. One that stores its state (``Detector.stores_state``) is fitted once per key
            while caching is on; later tasks and runs load the stored state (arrays, no pickle) instead.

            A constructor that refuses the (already type-checked) options is a bad option, reported as such on
            every row of the detector, not as a failed fit."""
            from .detector_state import from_arrays, to_arrays

            if state["fit_error"] is not None:
                raise state["fit_error"]
            if state["detector"] is None and det_key in self._fitted:
                state["detector"] = self._fitted[det_key]
            if state["detector"] is None:
                started, step = time.perf_counter(), "fit"
                _seed_everything(self.seed)
                try:
                    detector = cls(**resolved)
                except PLUGIN_FAILURES as exc:
                    state["fit_error"] = _FitFailed(f"bad options: {_describe(exc)}")
                    state["fit_traceback"] = traceback.format_exc(limit=-8)
                    state["fit_seconds"] = time.perf_counter() - started
                    raise state["fit_error"] from exc
                try:
                    fit_train = train_labelled if "labels" in needs else train
                    ctx = FitContext(fit_train.restricted(needs), val.restricted(needs), int(train.logits.shape[1]),
                                     self.seed, self.opts.device, handle if needs & {"gradients", "head"} else None)

                    def fit() -> None:
                        with handle.activity(f"detector:{spec.label}:fit"), \
                                self.progress.status(f"fitting {spec.label}") as say:
                            ctx.progress = say
                            detector.fit(ctx)

                    def fit_and_store() -> dict[str, np.ndarray]:
                        nonlocal step
                        fit()
                        step = "storing the fitted state"
                        return to_arrays(detector.state_dict(), spec.label)

                    if not (cls.stores_state() and self.cache.root is not None):
                        fit()
                    else:
                        arrays = self.cache.arrays(make_key("fitted", detector=det_key), fit_and_store)
                        if step == "fit":  # fit_and_store did not run: an earlier task or run stored the state
                            step = "loading the stored fitted state"
                            detector.load_state_dict(from_arrays(arrays), ctx)
                except PLUGIN_FAILURES as exc:
                    state["fit_error"] = _FitFailed(f"{step} failed: {_describe(exc)}")
                    state["fit_traceback"] = traceback.format_exc(limit=-8)
                    raise state["fit_error"] from exc
                finally:
                    state["fit_seconds"] = time.perf_counter() - started
                state["detector"] = detector
                self._fitted.clear()  # one at a time: a worker's memory holds one fitted detector
                self._fitted[det_key] = detector
            return state["detector"]

        return _Fitting(fitted, state, det_key, needs, cls)

    def fit_detector(self, spec: DetectorSpec) -> dict[str, Any]:
        """Fit ``spec`` (storing its state) or load its stored fit: what the ``fit`` task reports to the
        detector's ``evaluate`` tasks: seconds, the error and traceback if it failed, the detector's metadata."""
        fitting = self._fitting(spec)
        try:
            detector = fitting.fitted()
        except PLUGIN_FAILURES as exc:
            return {"seconds": fitting.state["fit_seconds"], "error": _describe(exc),
                    "traceback": fitting.state["fit_traceback"], "metadata": None}
        return {"seconds": fitting.state["fit_seconds"], "error": "", "traceback": None,
                "metadata": _metadata(detector)}

    def fitted_detector(self, spec: DetectorSpec) -> tuple[Detector, str]:
        """``spec`` fitted on this seed (or its stored fit loaded) and the fit's key: for analyses of a run."""
        fitting = self._fitting(spec)
        return fitting.fitted(), fitting.det_key

    def labelled_sets(self) -> dict[str, tuple[SplitView, np.ndarray]]:
        """The seed's image sets whose true labels are in the classifier's label space, with their outputs.

        ``val`` and ``test``; each attacked set, labelled with its clean images' labels (the class
        the attack moved the prediction away from); and each loaded set that a source of kind
        ``mistakes`` judges predictions on (so its labels are the classifier's classes: a corrupted
        test split is, an OOD set's own labels are not). A set that cannot be made is left out."""
        prepared = self.prepare()
        handle, model_key = prepared.handle, prepared.model_key
        test_set, val_set = self.id_split("test"), self.id_split("val")
        sets = {"val": (prepared.val, val_set.y), "test": (self.outputs(handle, model_key, test_set, "test"), test_set.y)}
        judged = {name for plugin, case in source_cases(self.source_plugins())
                  if (case.kind or plugin.kind) == "mistakes" for name in case.uses}
        for name, request in self.requests().items():
            if request.attack is None and name not in judged:
                continue
            try:
                view, labels = self.requested_outputs(handle, model_key, request)
            except PLUGIN_FAILURES:
                continue  # the sources that use the set are error rows; nothing to purify
            if request.attack is not None:
                labels = test_set.y[self._attack_subset()]
            if labels is not None:
                sets[name] = (view, np.asarray(labels))
        return {name: (view, labels) for name, (view, labels) in sets.items() if (labels != UNLABELED).all()}

    def detector_rows(self, spec: DetectorSpec, only: str | None = None,
                      fit_report: dict[str, Any] | None = None) -> tuple[list[dict], list[dict]]:
        """One row per failure source (``only``: for that source alone) and the timings of each."""
        prepared = self.prepare()
        handle, sources = prepared.handle, prepared.sources
        if only is not None:
            sources = [s for s in sources if s.name == only]
            if not sources:
                raise PluginError(f"the plan names a source '{only}' this seed does not have")
        fitting = self._fitting(spec, fit_report)
        fitted, state, det_key, needs, cls = fitting.fitted, fitting.state, fitting.det_key, fitting.needs, fitting.cls
        base = detector_fields(self.registry, spec, self.seed)
        # A whole image set's scores, once per task: sources share sets (every source's positives are test images),
        # and without a store (--no-cache) nothing else would keep them between sources.
        scored: dict[str, np.ndarray] = {}

        def scores_of(view: SplitView, tag: str, extra_key: str = "") -> np.ndarray:
            key = make_key("scores", detector=det_key, view=view.key, extra=extra_key)
            if key not in scored:
                scored[key] = score_set(key, view, tag)
            return scored[key]

        def score_set(key: str, view: SplitView, tag: str) -> np.ndarray:
            def compute() -> dict[str, np.ndarray]:
                detector = fitted()
                with handle.activity(f"detector:{spec.label}:score"):
                    values = np.asarray(detector.score(view.restricted(needs - {"labels"})), dtype=np.float64)
                if values.shape != (len(view),):
                    raise PluginError(f"score returned shape {values.shape} for {len(view)} inputs of {tag}")
                bad = int((~np.isfinite(values)).sum())
                if bad:
                    raise PluginError(f"score returned {bad} non-finite values (NaN/inf) on {tag}")
                return {"scores": values}

            return self.cache.arrays(key, compute)["scores"]

        rows, timings = [], []
        for source in self.progress.iterate(sources, f"{spec.label} x sources", total=len(sources)):
            started = time.perf_counter()
            row: dict[str, Any] = {**base, "source": source.name, "source_kind": source.kind,
                                   "negatives": source.negatives_are, "n_holdout": 0, "tuned_params": ""}
            try:
                if source.kind == "error":
                    raise _SourceFailed(source.negatives_are)
                row["n_holdout"] = source.n_holdout
                if cls.tunes_on_source:
                    pos, neg, tuned = self._tuned_scores(fitted, det_key, source, needs, handle, spec.label)
                    row["tuned_params"] = tuned
                else:
                    pos = scores_of(source.positives.parent, source.name)[source.positives.index]
                    neg = scores_of(source.negatives.parent, source.name)[source.negatives.index]
                row.update(compute_all(pos, neg, mistakes=source.kind == "mistakes",
                                       entropy=row_entropy(self.seed, spec.label, source.name)),
                           status="ok", error="")
                if not (len(pos) and len(neg)):
                    row.update(status="error", error=f"no {'positives' if not len(pos) else 'negatives'} to evaluate")
                else:
                    self.scores[(spec.label, source.name, self.seed)] = (np.asarray(pos, np.float64),
                                                                         np.asarray(neg, np.float64))
            except PLUGIN_FAILURES as exc:
                row.update(compute_all(np.empty(0), np.empty(0)), status="error", error=_describe(exc))
                if isinstance(exc, _FitFailed):  # the constructor's or fit's traceback, once per detector and seed
                    if state["fit_traceback"]:
                        row["traceback"], state["fit_traceback"] = state["fit_traceback"], None
                elif not isinstance(exc, (_SourceFailed, PluginError)):
                    row["traceback"] = traceback.format_exc(limit=6)
            rows.append(row)
            timings.append({"detector": spec.label, "source": source.name, "seed": self.seed,
                            "score_seconds": time.perf_counter() - started})
        for t in timings:
            t["fit_seconds"] = state["fit_seconds"]
        common = self.common_fields()
        for row in rows:
            row.update(common)
        if state["detector"] is not None and fit_report is None:
            self.detector_metadata[spec.label] = _metadata(state["detector"])
        return rows, timings

    def _tuned_scores(self, fitted: Callable[[], Detector], det_key: str, source: Source,
                      needs: frozenset[str], handle: ClassifierHandle, label: str):
        views = [part.view().restricted(needs - {"labels"}) for part in
                 (source.holdout_positives, source.holdout_negatives, source.positives, source.negatives)]
        key = make_key("tuned", detector=det_key, source=source.name, views=[v.key for v in views])

        def compute() -> dict[str, np.ndarray]:
            detector = fitted()
            with handle.activity(f"detector:{label}:tune"):
                choice = detector.tune(Holdout(source.name, views[0], views[1]))
            with handle.activity(f"detector:{label}:score"):
                pos = np.asarray(detector.score(views[2]), np.float64)
                neg = np.asarray(detector.score(views[3]), np.float64)
            for values, view in ((pos, views[2]), (neg, views[3])):
                if values.shape != (len(view),):
                    raise PluginError(f"score returned shape {values.shape} for {len(view)} inputs of {source.name}")
                bad = int((~np.isfinite(values)).sum())
                if bad:
                    raise PluginError(f"score returned {bad} non-finite values (NaN/inf) on {source.name}")
            return {"pos": pos, "neg": neg, "tuned": np.array(json.dumps(_jsonable(choice or {}), sort_keys=True))}

        arrays = self.cache.arrays(key, compute)
        return arrays["pos"], arrays["neg"], str(arrays["tuned"])

    def prepare(self) -> "Prepared":
        """The classifier, every shared output and the failure sources of this seed (each cached)."""
        if self._prepared is None:
            _seed_everything(self.seed)
            handle, model_key, model_entry, model_options = self.classifier()
            train_set = self.id_split("train")
            train = self.outputs(handle, model_key, train_set, "train", train_set.y)
            labelled = np.flatnonzero(train_set.y != UNLABELED)
            train_labelled = train if len(labelled) == len(train_set) else train.subset(labelled, "train (labelled)")
            val = self.outputs(handle, model_key, self.id_split("val"), "val", self.id_split("val").y)
            test, sources = self.sources(handle, model_key)
            meta = {"seed": self.seed, "model_key": model_key, "model_options": model_options,
                    "model_provider": f"{model_entry.provider} {model_entry.provider_version}",
                    "test_accuracy": float((test.predictions == self.id_split("test").y).mean()),
                    "train_images": len(train_set), "train_labels": len(labelled),
                    "sources": {s.name: {"n_pos": len(s.positives), "n_neg": len(s.negatives),
                                         "n_holdout": s.n_holdout} for s in sources if s.kind != "error"}}
            self._prepared = Prepared(handle, model_key, train, train_labelled, val, sources, meta)
        return self._prepared

    @property
    def prepared(self) -> "Prepared | None":
        """The seed's prepared state, or None before ``prepare`` ran."""
        return self._prepared

    def common_fields(self) -> dict[str, Any]:
        """The fields every row of this seed shares."""
        return {"schema_version": SCHEMA_VERSION, "benchmark": self.bench.name,
                "benchmark_sha256": self.bench.sha256[:16], "model": self.bench.model.plugin, "seed": self.seed,
                "model_weights": self.model_weights, "device": self.opts.device.type, "oodbench_version": __version__}


@dataclass
class _Fitting:
    """A detector being fitted on one seed: ``fitted()`` and what it records in ``state``."""

    fitted: Callable[[], Detector]
    state: dict[str, Any]
    det_key: str
    needs: frozenset[str]
    cls: type


def _metadata(detector: Detector) -> Any:
    try:
        return _jsonable(detector.metadata())
    except PLUGIN_FAILURES as exc:
        return {"error": _describe(exc)}


@dataclass
class Prepared:
    """What every detector of one seed reads: the classifier, shared outputs, the sources."""

    handle: ClassifierHandle
    model_key: str
    train: SplitView
    train_labelled: SplitView
    val: SplitView
    sources: list[Source]
    meta: dict[str, Any]


def detector_fields(registry: Registry, spec: DetectorSpec, seed: int) -> dict[str, Any]:
    """The fields that say which detector a row is about, exactly as configured."""
    entry = registry.get("detectors", spec.name)
    resolved = resolve_options(entry, spec.options, seed=seed)
    return {"detector": spec.label, "detector_plugin": entry.provider, "detector_version": entry.version,
            "detector_options": json.dumps(_jsonable(resolved), sort_keys=True),
            "tuned_on_source": bool(entry.target.tunes_on_source)}


def source_plugins(registry: Registry, bench: Benchmark, seed: int = 0) -> list[FailureSource]:
    """The benchmark's failure-source plugin instances, in row order (``Benchmark.sources``)."""
    return [instantiate(registry.get("sources", ref.plugin), ref.options, seed=seed) for ref in bench.sources]


#: the in-distribution splits' image-set names, which no failure source may ask for
ID_SPLITS = ("train", "val", "test")


def _planned(plugin: FailureSource, method: str) -> list[Any]:
    """``plugin.image_sets()`` or ``plugin.cases()``: what the plan is made of, before any data is read. A plugin
    that fails here stops the run with one line naming it (no row could say which of its rows it meant)."""
    try:
        return list(getattr(plugin, method)())
    except PluginError:
        raise
    except Exception as exc:
        raise PluginError(f"failure source '{plugin.name}': {method}() failed: {_describe(exc)}") from exc


def source_cases(plugins: list[FailureSource]) -> list[tuple[FailureSource, Case]]:
    """Every (plugin, case) of ``plugins``, in row order."""
    return [(plugin, case) for plugin in plugins for case in _planned(plugin, "cases")]


def image_requests(plugins: list[FailureSource]) -> dict[str, ImageRequest]:
    """The image sets ``plugins`` need, by name, loaded ones first, then attacked ones, each in first-asked order.

    Two sources asking for one name share the set, which must then be the same request."""
    requests: dict[str, ImageRequest] = {}
    for plugin in plugins:
        for request in _planned(plugin, "image_sets"):
            if request.name in ID_SPLITS:
                raise PluginError(f"source '{plugin.name}' asks for an image set named '{request.name}', the name "
                                  "of an in-distribution split")
            if requests.setdefault(request.name, request) != request:
                raise PluginError(f"two sources ask for different image sets under one name '{request.name}'")
    return {**{n: r for n, r in requests.items() if r.attack is None},
            **{n: r for n, r in requests.items() if r.attack is not None}}


def _labelled(images: ImageSet) -> ImageSet:
    """The images of ``images`` whose label is not withheld (all of them, as is, when none is)."""
    keep = np.flatnonzero(images.y != UNLABELED)
    return images if len(keep) == len(images) else images.subset(keep)


#: What a detector's code may raise that costs only its own rows. SystemExit too: a plugin's sys.exit() used to end
#: the whole run with exit 0 and nothing written. KeyboardInterrupt is left to the user, whose Ctrl-C it usually is.
PLUGIN_FAILURES = (Exception, SystemExit)


class _FitFailed(Exception):
    pass


class _SourceFailed(Exception):
    pass


def _failed_source(name: str, kind: str, exc: Exception) -> Source:
    empty = SplitView(name, np.empty((0, 0), np.float32), np.empty((0, 0), np.float32), ImageSet(np.empty((0, 1, 1, 1), np.uint8)))
    nothing = Part(empty, np.empty(0, np.int64))
    return Source(name, "error", f"source failed: {_describe(exc)}", nothing, nothing)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (_FitFailed, _SourceFailed)):
        return str(exc)
    if isinstance(exc, SystemExit):
        return f"the plugin called sys.exit({exc.code!r})"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, PluginError):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return _jsonable(value.tolist())
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def train_classifiers(opts: RunOptions, registry: Registry) -> list[dict[str, Any]]:
    """Train (or load) the benchmark's classifier for each seed into the cache, as ``run`` would.

    Per seed: the model's cache key, its file when cached, seconds spent, whether it came from
    the cache, and test accuracy (one forward pass of the test split). A later ``run`` with
    the same benchmark, seeds and cache then starts from these weights.
    """
    cache = Cache(opts.cache_dir)
    progress = Progress(enabled=opts.progress)
    out = []
    for seed in opts.seeds:
        started, hits = time.perf_counter(), cache.hits
        seed_run = SeedWork(opts, registry, cache, progress, seed)
        handle, key, _, options = seed_run.classifier()
        cached = cache.hits > hits
        # Through the cached extraction, so a later run does not repeat this forward pass.
        test = seed_run.outputs(handle, key, seed_run.id_split("test"), "test")
        out.append({"seed": seed, "model": opts.benchmark.model.plugin, "options": options, "key": key,
                    "file": cache.path_of(key, ".pt"), "cached": cached,
                    "seconds": time.perf_counter() - started,
                    "test_accuracy": float((test.predictions == seed_run.id_split("test").y).mean()),
                    "state_dict": handle.network.state_dict()})
    return out


def run_benchmark(opts: RunOptions, registry: Registry) -> RunResult:
    """Run every detector against every failure source of ``opts.benchmark`` for each seed.

    Plans the run (``plan.py``), hands the tasks to ``opts.executor`` and collects their
    results in plan order, so the rows are the same whichever executor ran them.
    """
    from .api import TaskFailed
    from .plan import make_plan, record_finished, summary
    from .tasks import Job, TaskResult, forget_prepared

    for spec in opts.detectors:  # fail fast on names and options, before any heavy work
        resolve_options(registry.get("detectors", spec.name), spec.options)
    # --threads holds for every task on every executor; unset, each executor chooses (torch's default in a local
    # worker; cores / workers on a Dask LocalCluster). A few fits (zheng's EM, pixelcnn's training) round differently
    # on 1 and 2 threads, so rows are byte-identical across executors at equal --threads.
    threads = opts.threads
    executor = instantiate(registry.get("executors", opts.executor),
                           {"workers": opts.workers, "scheduler": opts.scheduler, "task_timeout": opts.task_timeout,
                            "threads": threads, "progress": opts.progress})
    job = Job(opts, registry)
    tasks = make_plan(job)
    outcomes: dict[str, TaskResult | TaskFailed] = {}
    started = time.perf_counter()
    with Progress(enabled=opts.progress).counter(len(tasks), "tasks") as advance:
        def done(task, outcome) -> None:
            outcomes[task.key] = outcome
            advance()

        try:
            executor.run(tasks, done)
        finally:
            forget_prepared()  # the driver's memory is not a worker's: let the last seed's arrays go
    rows, timings, per_seed, scores = [], [], [], {}
    cache = {"hits": 0, "misses": 0, "quarantined": []}
    store = Cache(opts.cache_dir)
    task_records = []
    seeds: dict[int, dict[str, Any]] = {}
    prepared = None
    for task in tasks:
        outcome = outcomes.get(task.key)
        if task.seed not in seeds:
            seeds[task.seed] = seed_meta = {"passes": {}, "detectors": {}, "throughput": {}}
            per_seed.append(seed_meta)
        if task.kind == "sources":
            if not isinstance(outcome, TaskResult):
                failed = [outcomes[t.key] for t in tasks if t.seed == task.seed and isinstance(outcomes.get(t.key), TaskFailed)]
                reason = outcome or (failed[0] if failed else None) or "the task did not run"
                raise PluginError(f"seed {task.seed}: the classifier, its outputs or the failure sources could not be "
                                  f"made: {reason}")
            prepared = outcome
            merged = {**outcome.meta, **seed_meta}  # the seed's facts first, then what its tasks add up
            seed_meta.clear()
            seed_meta.update(merged)
        if outcome is None and task.kind == "evaluate":  # its fit's worker died or hung: say so on the row
            outcome = outcomes.get(task.deps[0])
        if isinstance(outcome, TaskFailed):
            outcome = TaskResult(rows=_failed_task_rows(registry, task, prepared, str(outcome)),
                                 meta={"detector_metadata": {task.detector: {"error": str(outcome)}}})
        elif outcome is None or (task.kind == "evaluate" and not outcome.rows):
            continue
        rows += outcome.rows
        timings += outcome.timings
        scores.update(outcome.scores)
        seed_meta["detectors"].update(outcome.meta.get("detector_metadata", {}))
        _add_passes(seed_meta["passes"], outcome.passes)
        _add_throughput(seed_meta["throughput"], outcome.throughput)
        for name in ("hits", "misses"):
            cache[name] += outcome.cache.get(name, 0)
        cache["quarantined"] += outcome.cache.get("quarantined", [])
        task_records.append({"kind": task.kind, "label": task.label, "detector": task.detector, "source": task.source,
                             "seconds": outcome.seconds,
                             "worker": outcome.worker, "status": "ok" if outcome.worker else "failed"})
        if outcome.worker and opts.cache_dir is not None:
            record_finished(task, store, outcome.seconds)
    for seed_meta in per_seed:
        seed_meta["throughput"] = _rates(seed_meta["throughput"])
    meta = {
        "schema_version": SCHEMA_VERSION,
        "oodbench_version": __version__,
        "torch_version": torch.__version__,
        "environment": environment(opts.device),
        "benchmark": {"name": opts.benchmark.name, "path": str(opts.benchmark.path), "sha256": opts.benchmark.sha256},
        "detectors": [{"label": s.label, "name": s.name, "options": s.options} for s in opts.detectors],
        "seeds": opts.seeds,
        "device": str(opts.device),
        "cache": {"dir": str(opts.cache_dir) if opts.cache_dir else None, **cache},
        "executor": {"name": opts.executor, "workers": opts.workers, "scheduler": opts.scheduler, "threads": threads,
                     "task_timeout": opts.task_timeout, "tasks": summary(tasks), "per_task": task_records},
        "wall_seconds": time.perf_counter() - started,
        "per_seed": per_seed,
    }
    return RunResult(rows, timings, meta, scores)


def _failed_task_rows(registry: Registry, task, prepared, reason: str) -> list[dict[str, Any]]:
    """A detector task that did not finish (its worker died, hung or raised): one error row per source."""
    if task.kind not in ("detector", "evaluate"):
        return []
    spec = task.args[2]
    empty = compute_all(np.empty(0), np.empty(0))
    return [{**detector_fields(registry, spec, task.seed), "source": name, "source_kind": kind, "negatives": negatives,
             "n_holdout": 0, "tuned_params": "", **empty, "status": "error", "error": f"task failed: {reason}",
             **prepared.common} for name, kind, negatives in prepared.sources
            if task.kind == "detector" or name == task.source]


def _add_passes(total: dict[str, dict[str, int]], passes: dict[str, dict[str, int]]) -> None:
    for activity, counts in passes.items():
        into = total.setdefault(activity, {"forward": 0, "forward_backward": 0})
        for kind, n in counts.items():
            into[kind] = into.get(kind, 0) + n


def _add_throughput(total: dict[str, dict[str, float]], throughput: dict[str, dict[str, float]]) -> None:
    for activity, numbers in throughput.items():
        into = total.setdefault(activity, {"images": 0, "network_seconds": 0.0, "wall_seconds": 0.0})
        for name in ("images", "network_seconds", "wall_seconds"):
            into[name] += numbers.get(name, 0)


def _rates(throughput: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    for numbers in throughput.values():
        wall = numbers["wall_seconds"]
        numbers["images_per_second"] = numbers["images"] / wall if wall else 0.0
        numbers["network_share"] = numbers["network_seconds"] / wall if wall else 0.0
    return throughput
