"""The contract between the oodbench core and its plugins: the one module plugins import.

Plugins import from this module (and ``hookimpl`` from ``oodbench``) and from nothing else in
the core; ``tests/test_public_surface.py`` checks the built-ins. ``__all__`` is the whole
surface:

* the value types a plugin receives (``ImageSet``, ``SplitView``, ``FitContext``,
  ``Holdout``, ``DatasetContext``) and the ``Classifier`` protocol: what a plugin may call on
  the trained classifier (``FitContext.model``, ``Attack.perturb``'s ``model``);
* the base classes a plugin subclasses (``Dataset``, ``Model``, ``Attack``, ``Detector``,
  ``Executor``; ``LayeredNetwork`` for networks);
* the errors it raises (``PluginError``, ``MissingDataError``; ``TaskFailed`` for executors);
* helpers plugins share with the core: ``check_scores`` (what the core checks a score
  array for), ``fpr_at_tpr`` (the leaderboard's FPR at 95% TPR, for tuning), ``atomic_write``
  (a file written through a temporary one and renamed), ``read_only`` and ``files_sha256``
  (a dataset's fingerprint: the sha256 of the files it reads).

The implementation of ``Classifier`` (batching, memory fitting, pass counting, bf16) is the
engine's ``oodbench.classifier.ClassifierHandle``; plugins never import it.

Conventions shared by every plugin:

* Images are NCHW in **[0, 1] pixel space**, either ``uint8`` (value / 255) or ``float32``.
  A classifier normalises its input itself, so attack and input-preprocessing step sizes
  (FGSM/BIM eps, ODIN eps) are always in pixel units, as in the ODIN authors' code.
* A detector's score is one float per input, **higher = more trustworthy**
  (in-distribution, clean, correctly classified). In every metric the trustworthy
  inputs are the positives.
* Plugin options are keyword-only ``__init__`` arguments with defaults; the core validates
  user options against that signature and records the resolved values in every result row.
  Every random choice takes the ``seed`` the core passes in.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from oodbench.cache import atomic_write
from oodbench.fingerprints import files_sha256

__all__ = [
    # value types
    "ImageSet", "SplitView", "FitContext", "Holdout", "DatasetContext", "Classifier",
    # base classes
    "Plugin", "Dataset", "Model", "Attack", "Detector", "Executor", "LayeredNetwork", "FailureSource",
    # failure sources' values
    "ImageRequest", "Case", "Side", "SourceContext",
    # errors
    "PluginError", "MissingDataError", "TaskFailed",
    # constants
    "NEEDS", "UNLABELED",
    # helpers
    "check_scores", "fpr_at_tpr", "atomic_write", "read_only", "files_sha256",
]

#: What a detector may declare in ``Detector.needs``.
NEEDS = frozenset({"logits", "features", "layers", "labels", "images", "gradients", "head"})

#: The label of a training image whose label a semi-supervised benchmark withholds
#: (``[in_distribution] labels_per_class``); only models with ``semi_supervised`` see such images.
UNLABELED = -1


class PluginError(Exception):
    """A plugin could not do its job; the message says why and is shown to the user as is."""


class MissingDataError(PluginError):
    """Data a dataset plugin needs is not on disk; the message names the file and where."""


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------
def read_only(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` that cannot be written through (the data are not copied)."""
    view = np.asarray(array).view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A set of images, NCHW in [0, 1] pixel space (``uint8`` means value/255), with optional labels.

    ``name`` says what the images are (shown in errors); ``num_classes`` is set by
    in-distribution datasets.
    """

    x: np.ndarray
    y: np.ndarray | None = None
    name: str = "images"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        # Plugins receive these arrays and the core shares them between detectors and the cache: read-only
        # views, so a plugin that writes into them fails on its own instead of changing others' numbers.
        object.__setattr__(self, "x", read_only(self.x))
        if self.y is not None:
            object.__setattr__(self, "y", read_only(self.y))
        if self.x.ndim != 4:
            raise PluginError(f"{self.name}: images must be NCHW, got shape {self.x.shape}")
        if self.x.dtype not in (np.uint8, np.float32):
            raise PluginError(f"{self.name}: images must be uint8 or float32, got {self.x.dtype}")
        if self.y is not None and len(self.y) != len(self.x):
            raise PluginError(f"{self.name}: {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def tensor(self, index: slice | np.ndarray = slice(None)) -> torch.Tensor:
        """Images ``index`` as a float32 tensor in [0, 1], a copy the caller may modify."""
        batch = torch.from_numpy(np.array(self.x[index]))
        if batch.dtype == torch.uint8:
            return batch.float().div_(255.0)
        return batch

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(self), batch_size):
            yield self.tensor(slice(start, start + batch_size))

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.x[index], None if self.y is None else self.y[index], self.name, self.num_classes)

    @property
    def key(self) -> str:
        """Content hash: two sets with the same pixels and labels share cached results."""
        cached = self.__dict__.get("_key")
        if cached is None:
            h = hashlib.sha256()
            h.update(str((self.x.shape, self.x.dtype.str)).encode())
            h.update(np.ascontiguousarray(self.x).data)
            if self.y is not None:
                h.update(np.ascontiguousarray(self.y.astype(np.int64)).data)
            cached = h.hexdigest()[:20]
            object.__setattr__(self, "_key", cached)
        return cached


@dataclass(frozen=True)
class DatasetContext:
    """What the core tells a dataset plugin when it asks for images.

    ``split``: ``"train"``, ``"val"`` or ``"test"`` for an in-distribution dataset; always
    ``"test"`` when the dataset is a failure source. ``image_shape``: the in-distribution
    (C, H, W) that an out-of-distribution set must be converted to (``None`` when loading the
    in-distribution data itself). ``size``: how many images a synthetic set should make
    (the in-distribution test size). ``in_distribution(split)`` loads the in-distribution
    split, for sets derived from it (flips, held-out classes).
    """

    split: str
    seed: int
    data_dir: Path
    image_shape: tuple[int, int, int] | None = None
    size: int | None = None
    in_distribution: Callable[[str], ImageSet] | None = None


# --------------------------------------------------------------------------------------
# The classifier, as plugins may use it
# --------------------------------------------------------------------------------------
@runtime_checkable
class Classifier(Protocol):
    """The trained classifier as plugins use it: ``FitContext.model`` and ``Attack.perturb``'s ``model``.

    This is everything a plugin may call on it; the core's implementation
    (``oodbench.classifier.ClassifierHandle``) batches every call, runs it on the run's device,
    fits the batch size to the device's memory (retrying smaller on out-of-memory) and counts
    every forward and backward pass by activity (``run.json`` -> ``passes``). So hand it whole
    sets, never chunks of a batch size of your own, and run the network through nothing else.
    Tensors go in as [0, 1] images (N x C x H x W, on any device) and come back on the CPU,
    float32, whatever the run's numerics (bf16, float64).

    What the model plugin's network provides (see ``Model``) decides what is available:
    ``forward_features`` always, ``forward_layers`` for ``has_layers``, a ``head`` module for
    ``has_head``.
    """

    #: the device passes run on (where an objective's tensors live)
    device: torch.device

    @property
    def has_layers(self) -> bool:
        """Whether the network exposes intermediate layers (``outputs_and_layers``, ``layers=True``)."""
        ...

    @property
    def has_head(self) -> bool:
        """Whether the network exposes its final layer (``head``, ``head_weight_bias``)."""
        ...

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits N x C, penultimate features N x D) of [0, 1] images; one forward pass per image."""
        ...

    def outputs_and_layers(self, images: torch.Tensor, layers: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits, penultimate features, [per-channel spatial means of intermediate layers, N x C_l each]).

        The same pass as ``outputs``; the layers are the network's ``forward_layers`` maps
        reduced as in Lee et al.'s code. ``PluginError`` when ``has_layers`` is false.
        """
        ...

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """The logits of ``outputs``."""
        ...

    def input_gradient(self, images: torch.Tensor, objective: Callable[..., torch.Tensor],
                       layers: bool = False, targets: torch.Tensor | None = None) -> torch.Tensor:
        """d objective / d images, one forward and one backward pass per image; on the CPU.

        ``objective(logits, features)`` returns one value per image (images do not interact,
        so the gradient of the sum is each image's own gradient); with ``layers=True`` it is
        called as ``objective(logits, features, layer_means)``. ``targets`` (one row per image,
        e.g. labels) are cut into the same batches as the images and handed to the objective
        as its last argument, on ``device``.
        """
        ...

    def head(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits (N x C, float32 NumPy) of penultimate features (N x D), through the network's final layer.

        ``head(view.features)`` gives ``view.logits`` again up to float rounding; apply it to
        changed features (clipped, pruned: ReAct, ASH, DICE) to get the logits they would have
        produced. Not counted as a pass through the network (it is one layer). ``PluginError``
        when ``has_head`` is false. Detectors declare ``"head"`` in ``needs`` to get the classifier.
        """
        ...

    def head_weight_bias(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(W, b) of an affine head as float64 NumPy copies, W (classes x D) and b (classes,); else None.

        The head is affine when it is an ``nn.Linear`` (b is zeros if it has no bias): then
        ``features @ W.T + b`` gives the logits up to float rounding (ViM). ``None`` for any
        other head; ``PluginError`` when there is no head at all.
        """
        ...

    def activity(self, name: str) -> ContextManager["Classifier"]:
        """A ``with`` block whose passes are counted under ``name`` in ``run.json``'s ``passes``.

        The core already charges a detector's passes to it (``detector:NAME:fit``, ``:tune``,
        ``:score``) and an attack's to ``attack:NAME:EPS``; a plugin may name a part of its work
        more finely (the block's passes then count under ``name`` only).
        """
        ...


class LayeredNetwork(torch.nn.Module):
    """Base for a classifier network that defines ``forward_layers`` (see ``Classifier``).

    ``forward_features`` and ``forward`` (logits) are derived from it, so a network states its
    layers once and every view of it agrees.
    """

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features, _ = self.forward_layers(x)
        return logits, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


# --------------------------------------------------------------------------------------
# What detectors see
# --------------------------------------------------------------------------------------
class SplitView:
    """One set of inputs as a detector sees it: cached classifier outputs, and access on demand.

    ``logits`` (N x C) and ``features`` (N x D, penultimate layer) are float32 NumPy arrays
    computed once per (model, data) and shared by every detector; ``layers`` (a list of
    N x C_l arrays, spatial means of intermediate layers) exist when the classifier exposes
    them and a detector of the run declares ``"layers"``. ``labels`` exist only on the
    in-distribution fit splits and only for detectors that declare ``"labels"``; ``images``
    only for detectors that declare ``"images"`` or ``"gradients"``. Asking for what was not
    declared raises, so the contract is enforced, not just documented.
    """

    def __init__(
        self,
        name: str,
        logits: np.ndarray,
        features: np.ndarray,
        images: ImageSet,
        labels: np.ndarray | None = None,
        allowed: frozenset[str] = NEEDS,
        key: str = "",
        layers: list[np.ndarray] | None = None,
    ):
        self.name = name
        #: content key of (classifier, inputs); the core uses it to cache scores
        self.key = key
        # Read-only views: every detector of the run reads the same arrays (see ImageSet).
        self._logits, self._features = read_only(logits), read_only(features)
        self._images, self._labels = images, None if labels is None else read_only(labels)
        self._allowed = allowed
        self._layers = None if layers is None else [read_only(layer) for layer in layers]

    def __len__(self) -> int:
        return len(self._logits)

    def _check(self, need: str) -> None:
        if need not in self._allowed:
            raise PluginError(f"detector read '{need}' of {self.name} without declaring it in Detector.needs")

    @property
    def logits(self) -> np.ndarray:
        return self._logits

    @property
    def predictions(self) -> np.ndarray:
        return self._logits.argmax(1)

    @property
    def features(self) -> np.ndarray:
        self._check("features")
        return self._features

    @property
    def layers(self) -> list[np.ndarray]:
        self._check("layers")
        if self._layers is None:
            raise PluginError(f"no intermediate-layer outputs for {self.name}: the classifier exposes no "
                              "forward_layers method")
        return self._layers

    @property
    def labels(self) -> np.ndarray:
        self._check("labels")
        if self._labels is None:
            raise PluginError(f"{self.name} has no labels (only in-distribution fit splits do)")
        return self._labels

    @property
    def images(self) -> ImageSet:
        if not ({"images", "gradients"} & self._allowed):
            self._check("images")
        return self._images

    def subset(self, index: np.ndarray, name: str | None = None) -> "SplitView":
        return SplitView(
            name or self.name,
            self._logits[index],
            self._features[index],
            self._images.subset(index),
            None if self._labels is None else self._labels[index],
            self._allowed,
            _subset_key(self.key, index),
            None if self._layers is None else [layer[index] for layer in self._layers],
        )

    def restricted(self, allowed: frozenset[str]) -> "SplitView":
        labels = self._labels if "labels" in allowed else None
        return SplitView(self.name, self._logits, self._features, self._images, labels, allowed, self.key,
                         self._layers)


def _subset_key(key: str, index: np.ndarray) -> str:
    if not key:
        return ""
    digest = hashlib.sha256(np.ascontiguousarray(np.asarray(index, dtype=np.int64)).data).hexdigest()[:12]
    return f"{key}[{digest}]"


def check_scores(values: Any, n: int, name: str = "inputs") -> np.ndarray:
    """``values`` as a float64 array of ``n`` finite scores, or ``PluginError`` saying what is wrong.

    What the core requires of ``Detector.score``'s result (a row whose scores fail it becomes
    ``error``); a detector that combines or tunes on its own scores may check them the same way.
    ``name`` says whose scores they are, in the message.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (n,):
        raise PluginError(f"score returned shape {array.shape} for {n} inputs of {name}")
    bad = int((~np.isfinite(array)).sum())
    if bad:
        raise PluginError(f"score returned {bad} non-finite values (NaN/inf) on {name}")
    return array


def fpr_at_tpr(pos: np.ndarray, neg: np.ndarray, tpr: float = 0.95) -> float:
    """The leaderboard's FPR at ``tpr`` TPR (``oodbench.metrics``): positives are the trustworthy inputs.

    FPR at the highest threshold whose TPR reaches ``tpr``, no interpolation; for detectors
    that tune on a source's holdout by the same criterion the leaderboard reports (ODIN).
    """
    from oodbench.metrics import fpr_at_tpr as leaderboard_fpr_at_tpr  # scipy and scikit-learn load on first use

    return leaderboard_fpr_at_tpr(pos, neg, tpr)


@dataclass
class FitContext:
    """What ``Detector.fit`` receives: in-distribution data and the classifier, nothing else.

    ``train`` and ``val`` are the in-distribution training and validation splits;
    ``model`` (the classifier) is available to detectors that declare ``"gradients"`` or ``"head"`` (else ``None``).
    """

    train: SplitView
    val: SplitView
    num_classes: int
    seed: int
    device: torch.device
    model: Classifier | None = None
    progress: Callable[[str], None] = field(default=lambda message: None)


@dataclass
class Holdout:
    """Held-out samples of one failure source, for detectors whose paper tunes on them (ODIN).

    ``positives``: trustworthy inputs (in-distribution / clean / correctly classified);
    ``negatives``: the source's failures. These inputs are excluded from evaluation for
    every detector, so all rows of a source are measured on the same inputs.
    """

    source: str
    positives: SplitView
    negatives: SplitView


# --------------------------------------------------------------------------------------
# Plugin base classes
# --------------------------------------------------------------------------------------
class Plugin:
    """Common to all plugins: a registry name, a version that enters cache keys, a summary.

    The first line of the class docstring is the one-line description ``oodbench list`` shows.
    Bump ``version`` whenever a change alters results, so cached outputs are not reused.
    """

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"


class Dataset(Plugin):
    """A source of images. ``load`` returns one split as an ``ImageSet``.

    In-distribution datasets provide ``"train"``, ``"val"`` and ``"test"`` with labels and
    ``num_classes``. Out-of-distribution datasets are asked for ``"test"`` and must convert
    their images to ``ctx.image_shape`` (document how in the class docstring).
    """

    splits: ClassVar[tuple[str, ...]] = ("test",)

    def load(self, ctx: DatasetContext) -> ImageSet:
        raise NotImplementedError

    def fingerprint(self, data_dir: Path) -> str:
        """What decides the images beyond the plugin, its version, options and the seed, known before
        ``load``: the sha256 of the files it reads (``files_sha256(paths)``), for every split; '' (the
        default) for images generated from the options and the seed. Part of the plan's task keys."""
        return ""


class Model(Plugin):
    """A classifier: an architecture, and either a training recipe or a checkpoint.

    ``build`` returns an ``nn.Module`` mapping [0, 1] images to logits, with
    ``forward_features(x) -> (logits, penultimate)``; input normalisation lives inside it.
    Optionally ``forward_layers(x) -> (logits, penultimate, [intermediate outputs])`` too,
    for detectors that read intermediate layers (see ``Classifier``); subclassing
    ``LayeredNetwork`` then derives ``forward_features`` and ``forward`` from it.
    ``train`` fits it in place (skipped when ``trainable`` is False: ``build`` then loads
    the weights). The core caches the trained weights.

    When the benchmark withholds labels (``labels_per_class``), a model with
    ``semi_supervised = True`` receives the whole training split, withheld labels set to
    ``UNLABELED``; any other model receives only the labelled images.
    """

    trainable: ClassVar[bool] = True
    semi_supervised: ClassVar[bool] = False
    #: the run's ``--data-dir``, set by the core before ``build``: relative checkpoint paths start here
    data_dir: Path = Path(".")
    #: set by the core before ``train`` when caching is on: a folder private to this training (model,
    #: options, data, seed) where a long recipe may save per-epoch state to resume an interrupted
    #: training; the core deletes it once the trained weights are cached
    resume_dir: Path | None = None

    def fingerprint(self) -> str:
        """What determines the weights beyond the options (e.g. a checkpoint's sha256); part of cache keys."""
        return ""

    def build(self, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> torch.nn.Module:
        raise NotImplementedError

    def train(
        self,
        network: torch.nn.Module,
        train: ImageSet,
        val: ImageSet,
        seed: int,
        device: torch.device,
        progress: Callable[[str], None],
    ) -> None:
        raise NotImplementedError


class Attack(Plugin):
    """An adversarial attack in [0, 1] pixel space (L-inf unless documented otherwise).

    ``perturb`` returns adversarial versions of ``images`` (float32, clipped to [0, 1]) for
    true ``labels`` and budget ``eps``, using only ``model`` to query the classifier.
    """

    def perturb(
        self,
        model: Classifier,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class ImageRequest:
    """An image set a failure source needs, made by the core: loaded (``dataset``) or attacked (``attack``),
    its outputs extracted once, cached, and shared by every source and detector that names it.

    ``name`` is the set's name everywhere (``ood:svhn``, ``adv:fgsm:0.05``): two sources that ask for
    the same name share the set. A ``dataset`` is loaded as a failure source (the test split,
    converted to the in-distribution format; its labels, if it keeps them, reach ``carve``).
    An ``attack`` perturbs the first ``[sources] attack_subset`` in-distribution test images at
    ``eps``: attacked image ``i`` is the attack of test image ``SourceContext.attack_subset[i]``.
    """

    name: str
    dataset: str | None = None
    attack: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    eps: float = 0.0


@dataclass(frozen=True)
class Case:
    """One failure source's row name (``mistakes``, ``ood:svhn``), what its negatives are in words, and the
    image sets (``"test"`` or a requested set's name) it carves from: if one of those could not be made,
    the core reports the source as failed without calling ``carve``. ``kind`` overrides the plugin's for
    this case (a source plugin may make rows of two kinds)."""

    name: str
    negatives_are: str
    uses: tuple[str, ...] = ("test",)
    #: the rows' ``source_kind`` when it is not the plugin's ``kind``
    kind: str = ""


@dataclass(frozen=True)
class Side:
    """Positives or negatives of a source: rows ``index`` of image set ``images``.

    ``pairs`` (optional, one id per row, on both sides): inputs that share an id are one pair, e.g.
    a clean test image and its adversarial or corrupted version. The core's holdout then takes a
    pair whole or not at all, so no detector tunes on one member and is scored on the other."""

    images: str
    index: np.ndarray
    pairs: np.ndarray | None = None


@dataclass(frozen=True)
class SourceContext:
    """What ``FailureSource.carve`` reads: per image set (``"test"`` and every request that was made), the
    classifier's predicted class and the true labels (None where the set has none)."""

    seed: int
    predictions: dict[str, np.ndarray]
    labels: dict[str, np.ndarray | None]
    #: the test images the attacks perturbed, in order
    attack_subset: np.ndarray


class FailureSource(Plugin):
    """A kind of failure: which inputs a detector should rank as trustworthy (positives) and which fail.

    Benchmark files name sources by plugin: each table of ``[[sources.<plugin>]]`` is one
    instance with those options (``mistakes``, ``ood`` and ``attacks`` also take the shorthand
    forms of the benchmark schema). Before any data is read, ``image_sets`` says which image
    sets the source needs and ``cases`` which rows it makes; once the sets' outputs exist,
    ``carve(case, ctx)`` returns its positives and negatives. The core holds part of each side
    out for detectors that tune on the source, evaluates the rest, and writes ``kind`` into
    the rows' ``source_kind``. Carving must be deterministic (use ``ctx.seed`` for any random
    choice). ``kind = "mistakes"`` marks positives and negatives as the classifier's right and
    wrong predictions on one set: the rows then get the selective-classification metrics.
    """

    kind: ClassVar[str] = ""

    def image_sets(self) -> list[ImageRequest]:
        return []

    def cases(self) -> list[Case]:
        raise NotImplementedError

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        raise NotImplementedError


class Detector(Plugin):
    """A failure detector: fit on in-distribution data, then one score per input.

    Score direction: **higher = more trustworthy**. Class attributes:

    * ``needs``: subset of ``NEEDS`` the detector reads. ``"labels"``: labels of the fit
      splits (when the benchmark withholds training labels, such a detector is fitted on the
      labelled training images only; every other detector on the whole training split);
      ``"features"``: penultimate features; ``"layers"``: spatial means of the classifier's
      intermediate layers (``SplitView.layers``); ``"images"``: raw inputs;
      ``"gradients"``: the classifier itself (``FitContext.model``) for input gradients;
      ``"head"``: the classifier's final layer, through ``FitContext.model``:
      ``model.head(features)`` recomputes logits from (changed) penultimate features and
      ``model.head_weight_bias()`` gives its W and b when it is affine (ReAct, ASH, DICE, ViM);
      keep ``ctx.model`` for ``score``. A classifier without a head fails such a fit.
    * ``tunes_on_source``: the paper tunes hyperparameters on held-out samples of each
      failure source (ODIN). The core then calls ``tune(holdout)`` before scoring a source,
      and the result rows say so.

    A detector whose fit is worth keeping implements ``state_dict`` and ``load_state_dict``
    (both, see ``stores_state``): the core then stores the fitted state once and loads it
    wherever it scores, instead of fitting again. One that does not is fitted and scored
    within one task.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    tunes_on_source: ClassVar[bool] = False

    def fit(self, ctx: FitContext) -> None:
        """Learn from in-distribution data only. Default: nothing to learn."""

    def tune(self, holdout: Holdout) -> dict[str, Any]:
        """Choose hyperparameters on held-out source samples; return the choice (recorded)."""
        raise NotImplementedError

    def score(self, view: SplitView) -> np.ndarray:
        """One float per input of ``view``; higher = more trustworthy."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """Facts about the fitted detector worth recording in run.json (JSON-serialisable)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What ``fit`` learned, as a flat dict the core stores, so that scoring elsewhere need not refit.

        Called right after ``fit`` (before any ``tune`` or ``score``). Values are NumPy
        arrays of a numeric or bool dtype (stored with dtype and shape exactly; convert
        tensors with ``.detach().cpu().numpy()``) or JSON: str, int, float, bool, None, and
        lists and str-keyed dicts of those (tuples come back as lists). Nothing else: the
        state is stored and read without pickle, so a file can never run code, and an
        estimator object must be stored as its coefficients. Options are not state: the
        core rebuilds the detector from the same options before ``load_state_dict``.
        Default: ``NotImplementedError``, i.e. this detector cannot be stored and is
        fitted and scored within one task.
        """
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        """Take up a stored ``state_dict`` instead of fitting; scores then equal the fitted detector's, bit for bit.

        Called on a fresh instance built with the same options, in place of ``fit``; afterwards
        ``tune``, ``score`` and ``metadata`` behave exactly as after ``fit`` (same direction,
        same values). ``ctx`` is the ``FitContext`` ``fit`` would have received, which the core
        always passes: take from it only what is not learned, such as the classifier for input
        gradients (``ctx.model``) and the device, never a refit. Without it, load onto the CPU;
        a detector that needs the classifier then raises ``PluginError``.
        Default: ``NotImplementedError`` (see ``state_dict``).
        """
        raise NotImplementedError

    def log_density(self, features: torch.Tensor) -> torch.Tensor:
        """Optional: the fitted density of penultimate features, log p(f) in nats, one per row of ``features``.

        ``features`` is an (N x D) float tensor that may require grad; the result must be
        differentiable in it with torch autograd (feature purification descends its gradient,
        ``oodbench purify``). Rows are independent: row i of the result depends on row i only.
        Only for a detector whose score is such a density; default: ``NotImplementedError``.
        """
        raise NotImplementedError

    @classmethod
    def has_log_density(cls) -> bool:
        """Whether the class overrides ``log_density`` (feature purification can use it)."""
        return cls.log_density is not Detector.log_density

    @classmethod
    def stores_state(cls) -> bool:
        """Whether the class overrides both ``state_dict`` and ``load_state_dict``, so its fits can be stored."""
        return (cls.state_dict is not Detector.state_dict
                and cls.load_state_dict is not Detector.load_state_dict)


class TaskFailed(Exception):
    """A task did not finish: its process died, it ran past its time limit, or it raised. Message: why."""


class Executor(Plugin):
    """Runs a planned run's tasks (``oodbench.plan.Task``): in this process, in workers, on a cluster.

    ``run`` calls ``task.fn(*task.args, *results_of_task.deps)`` for every task, each after its
    dependencies, and reports each outcome through ``done(task, result)`` where ``result`` is
    the function's return value, or a ``TaskFailed`` saying why there is none. Order of calls
    is free: the driver collects results in plan order. A task whose dependency failed is not
    run and not reported. Options come from the command line (``--workers``, ``--scheduler``,
    ``--task-timeout``); an executor ignores those it has no use for and says so in its docstring.
    """

    def __init__(self, workers: int | None = None, scheduler: str | None = None,
                 task_timeout: float | None = None, threads: int | None = None, progress: bool = True):
        self.workers, self.scheduler, self.task_timeout = workers, scheduler, task_timeout
        self.threads, self.progress = threads, progress

    #: whether tasks in different processes hand each other results through the store (a run without
    #: one, ``--no-cache``, is then refused before any work)
    needs_store: ClassVar[bool] = False

    def check(self) -> None:
        """Refuse, before any work, what this executor cannot do here (a missing package, a bad address):
        raise ``ValueError`` with one line. Default: nothing to check."""

    def run(self, tasks: list[Any], done: Callable[[Any, Any], None]) -> None:
        raise NotImplementedError


def __getattr__(name: str) -> Any:
    # ``ClassifierHandle`` lived here before the engine moved to ``oodbench.classifier``; old scripts
    # importing it from here keep working. It is not part of the contract (not in ``__all__``):
    # plugins type against ``Classifier``.
    if name == "ClassifierHandle":
        from oodbench.classifier import ClassifierHandle

        return ClassifierHandle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
