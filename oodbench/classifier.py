"""The engine's classifier: ``ClassifierHandle``, what plugins receive as ``oodbench.api.Classifier``.

Plugins never import this module: they type against the ``Classifier`` protocol of
``oodbench.api``, which says what they may call. Everything else here (batching, fitting the
batch size to memory, retrying smaller on out-of-memory, counting passes per activity,
bf16 and channels-last, the float64 copy) is the core's business and may change.
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch

from oodbench import memory
from oodbench.api import PluginError

#: The activity ``ClassifierHandle.fit_batch_sizes`` charges its probe passes to.
FIT_BATCH_SIZE = "fit-batch-size"


class ClassifierHandle:
    """The core's ``oodbench.api.Classifier``: batched, on the run's device, passes counted.

    What plugins may call is the protocol's (documented there); the rest of this class
    (``float64``, ``fit_batch_sizes``, ``passes``, ``throughput``, ``reset_counters``, ``network``)
    is for the core. The wrapped network maps [0, 1] images to logits and must provide
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


class _Activity:
    def __init__(self, handle: ClassifierHandle, name: str):
        self.handle, self.name, self.previous = handle, name, None

    def __enter__(self) -> ClassifierHandle:
        self.previous = self.handle._activity
        self.handle._switch(self.name)
        return self.handle

    def __exit__(self, *exc: object) -> None:
        self.handle._switch(self.previous)
