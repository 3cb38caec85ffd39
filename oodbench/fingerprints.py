"""Content fingerprints of the files a plugin reads: what keys a dataset before its images are loaded."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

# (absolute path, size, mtime_ns) -> sha256: the driver plans every run of a session, and a file that did
# not change on disk is not read again for it.
_HASHED: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """The sha256 of one file's bytes, read in 1 MiB blocks."""
    stat = os.stat(path)
    key = (str(Path(path).absolute()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def files_sha256(paths: Iterable[Path], root: Path | None = None) -> str:
    """One sha256 over the files' names and contents, in the order given.

    Names are taken relative to ``root`` when given (a folder moved elsewhere keeps its
    fingerprint); a file that is missing enters as ``missing`` (the load that follows says
    what is wrong, with the plugin's own message), so planning never fails on data.
    """
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else path.name
        content = file_sha256(path) if path.is_file() else "missing"
        digest.update(f"{name}\0{content}\n".encode())
    return digest.hexdigest()
