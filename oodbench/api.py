"""The contract between the oodbench core and its plugins.

Plugins import from this module and from nothing else in the core. It holds

* the value types a plugin receives (``ImageSet``, ``SplitView``, ``FitContext``,
  ``Holdout``, ``DatasetContext``) and the ``ClassifierHandle`` through which plugins
  run the classifier (so every forward/backward pass is batched and counted);
* the base classes a plugin subclasses (``Dataset``, ``Model``, ``Attack``, ``Detector``).

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

import copy
import hashlib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
import torch

from oodbench import memory

#: What a detector may declare in ``Detector.needs``.
NEEDS = frozenset({"logits", "features", "layers", "labels", "images", "gradients", "head"})

#: The activity ``ClassifierHandle.fit_batch_sizes`` charges its probe passes to.
FIT_BATCH_SIZE = "fit-batch-size"

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
# Running the classifier
# --------------------------------------------------------------------------------------
class ClassifierHandle:
    """The trained classifier as plugins use it: batched, on the run's device, passes counted.

    The wrapped network maps [0, 1] images to logits and must provide
    ``forward_features(x) -> (logits, penultimate_features)``. It may also provide
    ``forward_layers(x) -> (logits, penultimate_features, [intermediate outputs])`` for
    detectors that read intermediate layers (Lee et al.'s feature ensemble); each
    intermediate output (N x C x H x W, or N x D) is reduced to its per-channel spatial mean,
    as in Lee et al.'s code.

    It may also expose its final layer as ``network.head``: an ``nn.Module`` mapping the
    penultimate features to the logits, so that ``head(forward_features(x)[1])`` equals
    ``forward_features(x)[0]`` (every built-in network's is its final ``nn.Linear``). That
    equation is what "penultimate features" means. Detectors that recompute logits from
    changed features (ReAct, ASH, DICE) or read the weights (ViM) reach it through ``head``
    and ``head_weight_bias``; head evaluations are not counted in ``passes`` (they are not
    passes through the network, only a matrix product), their time is charged to the
    current activity.

    ``bf16`` runs passes under bfloat16 autocast and ``channels_last`` feeds the network
    channels-last tensors: GPU speed options (the runner enables them only on CUDA devices);
    outputs and gradients come back in float32 either way.

    ``float64()`` is a context in which passes run in float64 (a float64 copy of the network;
    outputs and gradients still come back in float32): float32 kernels round differently on
    other CPUs (AVX2 vs AVX-512) and thread counts, float64 ones by ~1e-16, far below float32's
    resolution, so the float32 results are the same on every machine. ~5x slower on a CPU.

    ``batch_size`` is the most images per pass; ``fit_batch_sizes`` lowers it, per kind of
    pass, to what the device's free memory holds (see ``oodbench.memory``); with
    ``fit_batch_size=True`` that happens before the first pass (so a run whose outputs are
    all cached never touches the network). A pass that still runs out of memory halves its
    kind's size and retries.
    """

    def __init__(self, network: torch.nn.Module, device: torch.device, batch_size: int = 512,
                 bf16: bool = False, channels_last: bool = False, fit_batch_size: bool = False):
        self.network = network.to(device).eval()
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        self.device = device
        #: the most images per pass, as asked
        self.batch_size = batch_size
        #: images per pass in use, by kind of pass ("forward", "forward_backward")
        self.batch_sizes = {"forward": batch_size, "forward_backward": batch_size}
        #: what ``fit_batch_sizes`` measured (empty until it runs)
        self.memory: dict[str, Any] = {}
        self._fit_before_first_pass = fit_batch_size
        self.bf16, self.channels_last = bf16, channels_last
        #: images pushed through the network, by kind of pass and by what the runner is doing
        self.passes: dict[str, dict[str, int]] = {}
        #: per activity: seconds inside network passes (transfers included) and seconds overall
        self.seconds: dict[str, dict[str, float]] = {}
        self._activity = "other"
        self._since = time.perf_counter()
        #: times the batch size was halved after running out of memory
        self.memory_backoffs = 0
        self._dtype = torch.float32
        self._network64: torch.nn.Module | None = None

    @property
    def numerics(self) -> str:
        """What makes outputs differ from plain fp32 NCHW in their last bits ("" when nothing); enters cache keys."""
        return "+".join(name for name, on in (("bf16", self.bf16), ("channels-last", self.channels_last)) if on)

    def count(self, kind: str, n: int) -> None:
        per_activity = self.passes.setdefault(self._activity, {"forward": 0, "forward_backward": 0})
        per_activity[kind] += n

    def _switch(self, activity: str) -> None:
        """Charge the time since the last switch to the current activity, then make ``activity`` current."""
        now = time.perf_counter()
        self.seconds.setdefault(self._activity, {"network": 0.0, "wall": 0.0})["wall"] += now - self._since
        self._since, self._activity = now, activity

    def reset_counters(self) -> None:
        """Forget the passes and seconds counted so far (a task reports only its own; the handle outlives it)."""
        self._switch(self._activity)
        self.passes, self.seconds = {}, {}

    def throughput(self) -> dict[str, dict[str, float]]:
        """Per activity that ran the network: images, seconds, images/s, and the share spent in passes.

        ``wall_seconds`` is the time the activity was current (nested activities are charged to
        the inner one), so ``network_share`` below 1 is what data handling and bookkeeping cost.
        """
        self._switch(self._activity)
        out = {}
        for activity, counts in self.passes.items():
            images = counts["forward"] + counts["forward_backward"]
            spent = self.seconds.get(activity, {"network": 0.0, "wall": 0.0})
            out[activity] = {"images": images, "network_seconds": spent["network"], "wall_seconds": spent["wall"],
                             "images_per_second": images / spent["wall"] if spent["wall"] else 0.0,
                             "network_share": spent["network"] / spent["wall"] if spent["wall"] else 0.0}
        return out

    @property
    def has_layers(self) -> bool:
        """Whether the network exposes intermediate layers (``forward_layers``)."""
        return callable(getattr(self.network, "forward_layers", None))

    @property
    def has_head(self) -> bool:
        """Whether the network exposes its final layer as ``network.head`` (an ``nn.Module``)."""
        return isinstance(getattr(self.network, "head", None), torch.nn.Module)

    def _head_module(self) -> torch.nn.Module:
        if not self.has_head:
            raise PluginError(f"the classifier ({type(self.network).__name__}) exposes no head (no `head` "
                              "module mapping its penultimate features to its logits)")
        return self.network.head

    @torch.inference_mode()
    def head(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits (N x C, float32 NumPy) of penultimate features (N x D), through the network's final layer.

        ``head(view.features)`` gives ``view.logits`` again up to float rounding; apply it to
        changed features (clipped, pruned) to get the logits they would have produced. Runs
        with the handle's numerics (bf16, float64) in batches of the forward pass's size, on
        the handle's device; not counted in ``passes`` (see the class docstring). Raises
        ``PluginError`` when the network exposes no head (``has_head``).
        """
        module = self._head_module()
        float64 = self._dtype == torch.float64
        if float64:
            module = self._network64.head
        # torch.tensor copies: views hand out read-only arrays, which torch.as_tensor would warn about
        feats = features if isinstance(features, torch.Tensor) else torch.tensor(np.asarray(features))
        if feats.dim() != 2:
            raise ValueError(f"head takes features of shape (N, D), got {tuple(feats.shape)}")
        dtype = torch.float64 if float64 else torch.float32
        size = max(1, self.batch_sizes["forward"])
        started, chunks = time.perf_counter(), []
        try:
            for start in range(0, max(len(feats), 1), size):  # one (empty) batch for no rows: the shape (0, C)
                batch = feats[start:start + size].to(self.device, dtype)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and not float64):
                    chunks.append(module(batch).float().cpu())
        finally:
            self._charge_network(time.perf_counter() - started)
        return torch.cat(chunks).numpy()

    def head_weight_bias(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(W, b) of an affine head as float64 NumPy copies, W (classes x D) and b (classes,); else None.

        The head is affine when it is an ``nn.Linear`` (b is zeros if it has no bias): then
        ``features @ W.T + b`` gives the logits up to float rounding. ``None`` for any other
        head; ``PluginError`` when there is no head at all.
        """
        module = self._head_module()
        if not isinstance(module, torch.nn.Linear):
            return None
        def copy(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().to("cpu", torch.float64, copy=True).numpy()

        weight = copy(module.weight)
        return weight, np.zeros(len(weight)) if module.bias is None else copy(module.bias)

    @contextmanager
    def float64(self) -> Iterator["ClassifierHandle"]:
        """Run the passes inside the block in float64 (results still float32); see the class docstring."""
        if self._network64 is None:
            self._network64 = copy.deepcopy(self.network).double()
        previous, self._dtype = self._dtype, torch.float64
        try:
            yield self
        finally:
            self._dtype = previous

    def _forward(self, x: torch.Tensor, layers: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        if layers and not self.has_layers:
            raise PluginError(f"the classifier ({type(self.network).__name__}) exposes no intermediate layers "
                              "(no forward_layers method)")
        network = self.network
        if self._dtype == torch.float64:
            network, x = self._network64, x.double()
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        # Outputs leave in float32 whatever ran inside, so objectives and detectors never see bf16; in float64
        # mode they stay float64 up to the objective too (callers store them as float32).
        dtype = torch.float64 if network is not self.network else torch.float32
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16 and network is self.network):
            if not layers:
                logits, feats = network.forward_features(x)
                return logits.to(dtype), feats.flatten(1).to(dtype), []
            logits, feats, maps = network.forward_layers(x)
        return logits.to(dtype), feats.flatten(1).to(dtype), [
            (m.flatten(2).mean(2) if m.dim() > 2 else m).to(dtype) for m in maps]

    def activity(self, name: str) -> "_Activity":
        """Attribute passes made inside the ``with`` block to ``name`` (e.g. ``extract:test``)."""
        return _Activity(self, name)

    @torch.inference_mode()
    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate features) of a batch of [0, 1] images, on CPU, float32."""
        logits, feats, _ = self.outputs_and_layers(images, layers=False)
        return logits, feats

    @torch.inference_mode()
    def outputs_and_layers(self, images: torch.Tensor, layers: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(logits, penultimate features, [spatial means of intermediate layers]) in one pass each."""
        def step(batch: torch.Tensor, rows: slice):
            out, feat, maps = self._forward(batch.to(self.device, non_blocking=True), layers)
            self.count("forward", len(batch))
            return out.float().cpu(), feat.float().cpu(), [m.float().cpu() for m in maps]

        chunks = self._in_batches(images, step, "forward")
        if not chunks:
            return torch.empty(0), torch.empty(0), []
        return (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]),
                [torch.cat([c[2][i] for c in chunks]) for i in range(len(chunks[0][2]))])

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]

    def input_gradient(
        self,
        images: torch.Tensor,
        objective: Callable[..., torch.Tensor],
        layers: bool = False,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """d objective / d images for a batch, one forward+backward per image.

        ``objective(logits, features)`` returns one value per image; images do not interact,
        so the gradient of the sum is each image's own gradient. With ``layers=True`` it is
        called as ``objective(logits, features, layer_means)`` (see ``outputs_and_layers``).
        ``targets`` (one row per image, e.g. labels) are cut into the same batches as the
        images, whatever batch size the device allows, and handed to the objective as its
        last argument, on the device. Returned on CPU.
        """
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"{len(targets)} targets for {len(images)} images")

        def step(batch: torch.Tensor, rows: slice) -> torch.Tensor:
            chunk = batch.to(self.device).detach().requires_grad_(True)
            extra = () if targets is None else (targets[rows].to(self.device),)
            with torch.enable_grad():
                logits, feats, maps = self._forward(chunk, layers)
                value = objective(logits, feats, maps, *extra) if layers else objective(logits, feats, *extra)
                (grad,) = torch.autograd.grad(value.sum(), chunk)
            self.count("forward_backward", len(chunk))
            return grad.cpu()

        grads = self._in_batches(images, step, "forward_backward")
        return torch.cat(grads) if grads else torch.zeros(images.shape)

    def fit_batch_sizes(self, image_shape: tuple[int, ...], available: int | None = None) -> dict[str, int]:
        """Lower each kind of pass's batch size to what fits in memory; returns the sizes.

        Probes the network on a few blank images (counted as passes of the activity
        ``fit-batch-size``) to measure bytes per image, with this handle's numerics; see
        ``oodbench.memory``. ``available`` (bytes) defaults to what the device has free now.
        """
        available = memory.available_bytes(self.device) if available is None else available

        def forward(n: int) -> None:
            with torch.inference_mode():
                self._forward(torch.zeros(n, *image_shape, device=self.device), False)

        def forward_backward(n: int) -> None:
            x = torch.zeros(n, *image_shape, device=self.device, requires_grad=True)
            with torch.enable_grad():
                torch.autograd.grad(self._forward(x, False)[0].logsumexp(1).sum(), x)

        self._fit_before_first_pass = False
        per_image = {}
        # the gradient probe needs autograd even when the first pass is an inference-mode one
        with self.activity(FIT_BATCH_SIZE), torch.inference_mode(False):
            started = time.perf_counter()
            try:
                for kind, run in (("forward", forward), ("forward_backward", forward_backward)):
                    per_image[kind] = memory.bytes_per_image(run)
                    self.count(kind, sum(memory.PROBE_SIZES))
            except Exception as error:
                # The probe is an optimisation: a network it cannot trace (a custom op, a shape it
                # rejects) keeps the asked sizes, and a real fault shows again in the first real pass.
                self.memory = {"probe_failed": f"{type(error).__name__}: {error}"}
                return dict(self.batch_sizes)
            finally:
                self._charge_network(time.perf_counter() - started)
        self.batch_sizes = {kind: memory.fit_batch_size(self.batch_size, per_image[kind], available)
                            for kind in self.batch_sizes}
        self.memory = {"available_bytes": available, "bytes_per_image": per_image,
                       "budget_fraction": memory.BUDGET_FRACTION, "allocator_overhead": memory.ALLOCATOR_OVERHEAD,
                       "fitted": dict(self.batch_sizes)}
        return dict(self.batch_sizes)

    def _charge_network(self, seconds: float) -> None:
        self.seconds.setdefault(self._activity, {"network": 0.0, "wall": 0.0})["network"] += seconds

    def _in_batches(self, images: torch.Tensor, step: Callable[[torch.Tensor, slice], Any], kind: str) -> list[Any]:
        """``step(batch, rows)`` on consecutive batches of the ``kind`` of pass's size; halves it on out-of-memory.

        The smaller size is kept for the rest of the run (``batch_sizes`` is read back into
        run.json), so a batch size too large for the device costs one failed batch, not a crash.
        Passes are counted by ``step`` only once it succeeds.
        """
        if self._fit_before_first_pass and len(images):
            self.fit_batch_sizes(tuple(images.shape[1:]))
        results, start = [], 0
        while start < len(images):
            rows = slice(start, start + self.batch_sizes[kind])
            batch = images[rows]
            started = time.perf_counter()
            try:
                results.append(step(batch, rows))  # ends in a copy to the CPU, so the time includes the device's work
            except torch.OutOfMemoryError:
                if self.batch_sizes[kind] == 1:
                    raise PluginError(f"out of memory on {self.device} even with one image per batch") from None
                self.batch_sizes[kind] //= 2
                self.memory_backoffs += 1
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            self._charge_network(time.perf_counter() - started)
            start += len(batch)
        return results


class LayeredNetwork(torch.nn.Module):
    """Base for a classifier network that defines ``forward_layers`` (see ``ClassifierHandle``).

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


class _Activity:
    def __init__(self, handle: ClassifierHandle, name: str):
        self.handle, self.name, self.previous = handle, name, None

    def __enter__(self) -> ClassifierHandle:
        self.previous = self.handle._activity
        self.handle._switch(self.name)
        return self.handle

    def __exit__(self, *exc: object) -> None:
        self.handle._switch(self.previous)


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
    model: ClassifierHandle | None = None
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


class Model(Plugin):
    """A classifier: an architecture, and either a training recipe or a checkpoint.

    ``build`` returns an ``nn.Module`` mapping [0, 1] images to logits, with
    ``forward_features(x) -> (logits, penultimate)``; input normalisation lives inside it.
    Optionally ``forward_layers(x) -> (logits, penultimate, [intermediate outputs])`` too,
    for detectors that read intermediate layers (see ``ClassifierHandle``); subclassing
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
        model: ClassifierHandle,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        generator: torch.Generator,
    ) -> torch.Tensor:
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
