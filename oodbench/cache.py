"""A content-addressed store: key -> arrays or a torch state dict, written atomically.

A key is the hash of a JSON description of everything that determines the value (plugin
names, versions, options, seeds, and the keys of the inputs), so equal work is found
again across runs and a killed run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import platformdirs


def default_cache_dir() -> Path:
    return Path(os.environ.get("OODBENCH_CACHE_DIR") or platformdirs.user_cache_dir("oodbench"))


def make_key(kind: str, **parts: Any) -> str:
    """Stable hash of ``parts``; ``kind`` keeps keys of different tasks apart and readable."""
    blob = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import: os.umask can only be read by setting it, which would race with threads.
_UMASK = _umask()


def atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file.

    The file gets the permissions an ordinary ``open`` would give (0666 less the umask), not
    the owner-only 0600 of the temporary file, so shared result folders stay readable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Cache:
    """Arrays (``.npz``) and checkpoints (``.pt``) under one folder, by key. ``None`` disables it."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def _path(self, key: str, suffix: str) -> Path:
        assert self.root is not None
        return self.root / key.split("-", 1)[0] / f"{key}{suffix}"

    def arrays(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays stored under ``key``, computing and storing them first if absent."""
        if self.root is not None:
            path = self._path(key, ".npz")
            if path.exists():
                try:
                    with np.load(path, allow_pickle=False) as data:
                        arrays = {k: data[k] for k in data.files}
                    self.hits += 1
                    return arrays
                except (OSError, ValueError):  # a damaged entry is recomputed, not fatal
                    path.unlink(missing_ok=True)
        self.misses += 1
        arrays = compute()
        if self.root is not None:
            atomic_write(self._path(key, ".npz"), lambda f: np.savez(f, **arrays))
        return arrays

    def scratch_dir(self, key: str) -> Path | None:
        """A folder for work in progress on ``key`` (e.g. per-epoch training state); None when caching is off."""
        return None if self.root is None else self.root / "scratch" / key

    def path_of(self, key: str, suffix: str) -> Path | None:
        """Where ``key`` is stored (``.npz`` arrays, ``.pt`` checkpoints); None when caching is off or it is absent."""
        if self.root is None:
            return None
        path = self._path(key, suffix)
        return path if path.exists() else None

    def state_dict(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        import torch

        if self.root is not None:
            path = self._path(key, ".pt")
            if path.exists():
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                    self.hits += 1
                    return state
                except (OSError, RuntimeError, EOFError):
                    path.unlink(missing_ok=True)
        self.misses += 1
        state = compute()
        if self.root is not None:
            atomic_write(self._path(key, ".pt"), lambda f: torch.save(state, f))
        return state
