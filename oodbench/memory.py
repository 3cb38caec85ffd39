"""How many images one classifier pass can take without running out of memory.

A batch size is fitted before the run's first pass from two measurements:

- **bytes per image** of a pass: the peak of live tensor bytes while it runs, seen by a
  dispatch mode that sees every tensor the pass creates, on any device (autograd's saved
  tensors and the backward pass's gradients included). It is measured at two probe batch
  sizes and differenced, so what does not grow with the batch (weights, caches) cancels;
- **available memory**: free GPU memory (``torch.cuda.mem_get_info``) on CUDA; on a CPU,
  Linux's ``MemAvailable``, bounded by the cgroup's limit when the process runs in one
  (a container's 24 GiB, not the host's 512).

The batch is then at most ``BUDGET_FRACTION`` of the available memory divided by
``ALLOCATOR_OVERHEAD`` times the bytes per image: the rest of the run (images, features, the
cache) lives in the same memory, and allocators hold more than the live bytes (on CPU a
pass's peak resident set grew by 0.89x to 1.17x the estimate for DenseNet-BC-100,
WRN-28-10 and ImageNet's ResNet-50, up to 1.28x on a small pass where fixed costs weigh
most: BENCHMARKS.md). The fitted size only ever lowers the size a benchmark asks for, so on
a machine with room the batches, and the run's numbers, are the asked ones. Where the
estimate still falls short (a GPU's convolution workspaces are not tensors),
``ClassifierHandle`` halves the batch on out-of-memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BUDGET_FRACTION = 0.5
ALLOCATOR_OVERHEAD = 1.25
PROBE_SIZES = (2, 4)


class LivePeak(TorchDispatchMode):
    """Peak bytes of the tensor storages alive at once among those created inside the ``with``."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                ref = StorageWeakRef(storage)
                # views share their base's storage: count it once
                self._live.setdefault(ref.cdata, (ref, storage.nbytes()))
        for key in [key for key, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[key]
        self.peak = max(self.peak, sum(size for _, size in self._live.values()))
        return out


def peak_bytes(run: Callable[[], object]) -> int:
    """Peak live bytes of the tensors ``run()`` creates (its result is dropped before returning)."""
    with LivePeak() as mode:
        run()
    return mode.peak


def bytes_per_image(run: Callable[[int], object], sizes: tuple[int, int] = PROBE_SIZES) -> float:
    """Live bytes one more image adds to ``run(batch_size)`` (a pass that creates its own input)."""
    small, large = sizes
    return max(0.0, (peak_bytes(lambda: run(large)) - peak_bytes(lambda: run(small))) / (large - small))


def available_bytes(device: torch.device, root: Path = Path("/")) -> int | None:
    """Memory a pass on ``device`` may still take, in bytes; None where the platform does not say.

    ``root`` is where /proc and /sys are looked for (tests point it at a fake tree).
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks torch's caching allocator holds but no tensor uses are free to this process too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    known = [v for v in (_meminfo_available(root), _cgroup_room(root)) if v is not None]
    return min(known) if known else None


def fit_batch_size(asked: int, per_image: float, available: int | None) -> int:
    """``asked``, or the largest power of two that fits the budget when ``asked`` does not."""
    if available is None or per_image <= 0:
        return asked
    fits = int(BUDGET_FRACTION * available / (ALLOCATOR_OVERHEAD * per_image))
    if fits >= asked:
        return asked
    return 1 << (fits.bit_length() - 1) if fits >= 1 else 1


def _meminfo_available(root: Path) -> int | None:
    try:
        text = (root / "proc/meminfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    return None


def _cgroup_room(root: Path) -> int | None:
    """Limit minus usage of this process's memory cgroup (v2, else v1); None when unlimited or unknown."""
    for limit_file, usage_file in (("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current"),
                                   ("sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = (root / limit_file).read_text().strip()
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        # v1 writes a huge number for "no limit", v2 writes "max"
        if limit == "max" or int(limit) >= 1 << 60:
            return None
        return max(0, int(limit) - usage)
    return None


def peak_resident_bytes() -> int:
    """This process's peak resident set in bytes (Linux's VmHWM), for measuring what a step adds.

    Not ``resource.getrusage().ru_maxrss``: after fork and exec that reports at least the
    parent's resident set at the fork, so in a child of a 1.5 GB pytest process it hides
    anything smaller.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        raise RuntimeError("peak resident memory is read from /proc/self/status, which this platform lacks") from None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM line in /proc/self/status")
