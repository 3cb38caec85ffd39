"""What a run's numbers depend on beyond its inputs: package versions, CPU, threads, GPU.

Recorded in run.json (``environment``) so that anyone can tell why a re-run differs: float32
kernels differ between instruction sets (AVX2 vs AVX-512), BLAS libraries and thread counts,
and attacks and trained networks amplify those last bits.
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: The numeric packages whose versions can move a number (constraints/leaderboards.txt pins them).
NUMERIC_PACKAGES = ("torch", "torchvision", "numpy", "scipy", "scikit-learn", "pandas")


def package_versions(names: tuple[str, ...] = NUMERIC_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """CPU model name, family/model numbers and vector extensions, from /proc/cpuinfo where there is one."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, sep, value = line.partition(":")
            key = key.strip()
            if not sep:
                if fields:  # the first processor's block is enough
                    break
                continue
            fields.setdefault(key, value.strip())
    except OSError:
        pass
    flags = fields.get("flags", fields.get("Features", "")).split()
    return {
        "name": fields.get("model name") or platform.processor() or platform.machine(),
        "family": fields.get("cpu family"),
        "model": fields.get("model"),
        "machine": platform.machine(),
        "vector_extensions": sorted(f for f in flags if f.startswith(("avx", "sse4", "fma", "amx", "sve", "asimd"))),
    }


def environment(device: Any = None) -> dict[str, Any]:
    """The run's software and hardware: for run.json's ``environment``."""
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "cpu": {**cpu_model(), "torch_capability": _torch_capability(), "logical_cores": os.cpu_count()},
        "threads": {"torch": torch.get_num_threads(), "blas_openmp": _threadpools()},
    }
    if device is not None and getattr(device, "type", None) == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = {"name": torch.cuda.get_device_name(index), "cuda": torch.version.cuda,
                       "cudnn": torch.backends.cudnn.version(), "driver": _nvidia_driver()}
    return info


def _torch_capability() -> str | None:
    """The instruction set torch's CPU kernels dispatch to (e.g. AVX512, AVX2), or None when unknown."""
    import torch

    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def _threadpools() -> list[dict[str, Any]]:
    """BLAS and OpenMP libraries loaded in this process, with their thread counts (threadpoolctl)."""
    from threadpoolctl import threadpool_info

    keep = ("user_api", "internal_api", "version", "num_threads", "architecture")
    return sorted(({k: pool.get(k) for k in keep} for pool in threadpool_info()),
                  key=lambda pool: (str(pool["internal_api"]), str(pool["version"])))


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version, from the kernel module's file (no nvidia-smi needed)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    for word in text.split():
        if word.count(".") >= 1 and word.replace(".", "").isdigit():
            return word
    return None
