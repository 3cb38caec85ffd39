"""A content-addressed store: key -> arrays or a torch state dict, written atomically and verified on read.

A key is the hash of a JSON description of everything that determines the value (plugin
names, versions, options, seeds, and the keys of the inputs), so equal work is found
again across runs and a killed run resumes where it stopped.

Layout under the root: ``<kind>/<key>.npz`` (arrays) or ``<kind>/<key>.pt`` (a state dict),
``kind`` being the key's prefix, each with a checksum file ``<key>.npz.json`` beside it:
the sha256 and length of the data file's bytes, and per array (tensor) name its shape and
dtype. ``scratch/`` holds work in progress, ``quarantine/`` entries that failed their check.

Why a checksum file beside the data rather than a member inside it: the entry stays a plain
``.npz`` / ``.pt`` that ``np.load`` and ``torch.load`` read (``oodbench train`` hands out the
``.pt`` path as the weights file), and a checksum of the file's exact bytes catches every
change to them, a valid file written behind the cache's back included, which no record
inside that file could. The checksum file is written (atomically) after the data, so a
crash between the two leaves data without a checksum: unverifiable, hence recomputed.
Two runs writing one key at once can pair one's data with the other's checksum; that
entry fails its check and is recomputed once: it costs time, never a wrong value.

Reading hashes the bytes it loads (read once into memory, hashed, then parsed from there),
so verification costs one sha256 pass over data that is read anyway, and what is checked
is what is used. An entry that fails in any way (unreadable, no or a bad checksum file,
other bytes, other array shapes, a directory in its place) is moved into ``quarantine/``
with the reason, named in one warning, and recomputed: never trusted, never fatal.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, NamedTuple

import numpy as np
import platformdirs

CHECKSUM_SUFFIX = ".json"
RECORD_FORMAT = 1
QUARANTINE = "quarantine"
SCRATCH = "scratch"
# A temporary file this old belongs to a write that died: no write takes an hour.
STALE_TEMP_SECONDS = 3600


class CacheWarning(UserWarning):
    """A cache entry was set aside or could not be stored; the run goes on without it."""


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


class _Format(NamedTuple):
    """How one kind of value is written, read, and summed up for its checksum file."""

    save: Callable[[BinaryIO, Any], None]
    load: Callable[[BinaryIO], Any]
    describe: Callable[[Any], dict[str, dict[str, Any]]]


def _load_npz(handle: BinaryIO) -> dict[str, np.ndarray]:
    with np.load(handle, allow_pickle=False) as data:  # never unpickle what a file says
        return {name: data[name] for name in data.files}


def _describe_arrays(arrays: dict[str, Any]) -> dict[str, dict[str, Any]]:
    # asanyarray: what np.savez stores of each value, so the store's record matches a later read.
    return {name: {"shape": list(np.shape(value)), "dtype": np.asanyarray(value).dtype.str}
            for name, value in arrays.items()}


def _save_state(handle: BinaryIO, state: dict[str, Any]) -> None:
    import torch

    torch.save(state, handle)


def _load_state(handle: BinaryIO) -> dict[str, Any]:
    import torch

    return torch.load(handle, map_location="cpu", weights_only=True)


def _describe_state(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    import torch

    return {name: {"shape": list(value.shape), "dtype": str(value.dtype)} if isinstance(value, torch.Tensor)
            else {"type": type(value).__name__} for name, value in state.items()}


_FORMATS = {
    ".npz": _Format(lambda handle, arrays: np.savez(handle, **arrays), _load_npz, _describe_arrays),
    ".pt": _Format(_save_state, _load_state, _describe_state),
}


class Damaged(Exception):
    """Why an entry cannot be trusted."""


def checksum_path(path: Path) -> Path:
    """The checksum file that vouches for the entry at ``path``."""
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def _one_line(text: str, limit: int = 200) -> str:
    # Exception texts can span lines; the warning must stay one line.
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _reason(exc: Exception) -> str:
    return _one_line(str(exc) if isinstance(exc, Damaged) else f"{type(exc).__name__}: {exc}")


def _read_record(path: Path) -> dict[str, Any]:
    record_path = checksum_path(path)
    if not record_path.exists():
        raise Damaged("no checksum")
    try:
        record = json.loads(record_path.read_text())
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise Damaged(f"unreadable checksum file: {exc}") from None
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or not isinstance(record.get("sha256"), str) or not isinstance(record.get("bytes"), int)
            or not isinstance(record.get("members"), dict)):
        raise Damaged("invalid checksum file")
    return record


def read_verified(path: Path) -> Any:
    """The value stored at ``path``, checked against its checksum file; raises if it cannot be trusted."""
    fmt = _FORMATS[path.suffix]
    if not path.is_file():
        raise Damaged("not a regular file")
    record = _read_record(path)
    data = path.read_bytes()
    if len(data) != record["bytes"]:  # before hashing: a truncated file needs no sha256 to be caught
        raise Damaged(f"{len(data)} bytes where {record['bytes']} were written")
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise Damaged("checksum mismatch: the bytes changed since they were written")
    value = fmt.load(io.BytesIO(data))
    if not isinstance(value, dict) or fmt.describe(value) != record["members"]:
        raise Damaged("the stored names, shapes or dtypes differ from the record")
    return value


def _write_hashed(path: Path, save: Callable[[BinaryIO], None]) -> tuple[str, int]:
    """Write atomically; the sha256 and length of the bytes written, hashed before the rename.

    Hashing the temporary file (re-read from the page cache) rather than a serialised copy in
    memory keeps the peak memory of storing a large entry at one copy; hashing it before the
    rename means a concurrent writer's file is never the one described.
    """
    result: list[tuple[str, int]] = []

    def write(handle: BinaryIO) -> None:
        save(handle)
        handle.flush()
        handle.seek(0)
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        result.append((digest, handle.tell()))

    atomic_write(path, write, mode="w+b")
    return result[0]


def _tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) at ``path``: one file, or every file under a folder."""
    if path.is_symlink() or not path.is_dir():
        return 1, path.lstat().st_size
    files = [p for p in path.rglob("*") if p.is_symlink() or p.is_file()]
    return len(files), sum(p.lstat().st_size for p in files)


def _mtime(path: Path) -> float:
    """Modification time, 0 for something absent (never written, or removed meanwhile)."""
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(path: Path) -> tuple[int, int]:
    """Delete a file or folder; the (files, bytes) it held. Something already gone counts nothing."""
    try:
        counted = _tree_size(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:  # removed meanwhile by another run or prune
        return 0, 0
    return counted


class Cache:
    """Arrays (``.npz``) and checkpoints (``.pt``) under one folder, by key. ``None`` disables it.

    ``hits`` and ``misses`` count reads served and values computed; ``quarantined`` lists
    the entries set aside (file, reason, where they went) for the run's record.
    """

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0
        self.quarantined: list[dict[str, str]] = []

    def _path(self, key: str, suffix: str) -> Path:
        assert self.root is not None
        return self.root / key.split("-", 1)[0] / f"{key}{suffix}"

    def arrays(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays stored under ``key``, computing and storing them first if absent or damaged."""
        return self._get(key, ".npz", compute)

    def state_dict(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The state dict stored under ``key``, computing and storing it first if absent or damaged."""
        return self._get(key, ".pt", compute)

    def _get(self, key: str, suffix: str, compute: Callable[[], Any]) -> Any:
        path = self._path(key, suffix) if self.root is not None else None
        if path is not None and path.exists():
            try:
                value = read_verified(path)
            except MemoryError:  # a sound entry too big for now: setting it aside would lose it
                raise
            except Exception as exc:
                self._set_aside(path, _reason(exc))
            else:
                self.hits += 1
                self._mark_used(path)
                return value
        self.misses += 1
        value = compute()
        if path is not None:
            self._store(path, value)
        return value

    def _store(self, path: Path, value: Any) -> None:
        fmt = _FORMATS[path.suffix]
        try:
            digest, size = _write_hashed(path, lambda handle: fmt.save(handle, value))
            record = {"format": RECORD_FORMAT, "sha256": digest, "bytes": size, "members": fmt.describe(value)}
            atomic_write(checksum_path(path), lambda handle: json.dump(record, handle, indent=1), mode="w")
        except OSError as exc:  # a full disk or a read-only cache costs the reuse, not the run's results
            warnings.warn(f"cannot store cache entry {path} ({_reason(exc)}); going on without caching it",
                          CacheWarning, stacklevel=4)

    def _set_aside(self, path: Path, reason: str) -> None:
        try:
            folder = str(self.quarantine(path, reason))
            where = f"moved to {folder}"
        except OSError as exc:
            folder, where = "", f"could not be moved aside ({_reason(exc)})"
        self.quarantined.append({"file": str(path), "reason": reason, "moved_to": folder})
        warnings.warn(f"damaged cache entry {path} ({reason}): {where}; recomputing it", CacheWarning, stacklevel=4)

    def _mark_used(self, path: Path) -> None:
        # The checksum file's mtime is the entry's last use, for 'prune --older-than': access
        # times are unreliable (noatime, relatime) and reading for 'verify' would reset them.
        try:
            os.utime(checksum_path(path))
        except OSError:
            pass  # a read-only cache is still readable

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move the entry at ``path`` and its checksum file into a new folder under ``quarantine/``.

        The folder (returned) also holds ``reason.txt``, so what went wrong survives for a
        look later; nothing in it is ever read back.
        """
        assert self.root is not None
        (self.root / QUARANTINE).mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        folder = Path(tempfile.mkdtemp(dir=self.root / QUARANTINE, prefix=f"{path.name}.{stamp}."))
        for part in (path, checksum_path(path)):
            try:
                os.replace(part, folder / part.name)
            except FileNotFoundError:  # never written, or set aside by a concurrent run
                pass
        (folder / "reason.txt").write_text(reason + "\n")
        return folder

    def scratch_dir(self, key: str) -> Path | None:
        """A folder for work in progress on ``key`` (e.g. per-epoch training state); None when caching is off."""
        return None if self.root is None else self.root / SCRATCH / key

    def path_of(self, key: str, suffix: str) -> Path | None:
        """Where ``key`` is stored (``.npz`` arrays, ``.pt`` checkpoints); None when caching is off or it is absent."""
        if self.root is None:
            return None
        path = self._path(key, suffix)
        return path if path.exists() else None

    def _kind_dirs(self) -> list[Path]:
        assert self.root is not None
        return sorted(p for p in self.root.iterdir()
                      if p.is_dir() and not p.is_symlink() and p.name not in (QUARANTINE, SCRATCH))

    def entries(self) -> list[Path]:
        """Every entry's data path, damaged ones included: a folder in an entry's place, or a
        checksum file whose data is gone (the data path is then missing)."""
        found = set()
        for folder in self._kind_dirs():
            for item in folder.iterdir():
                name = item.name.removesuffix(CHECKSUM_SUFFIX)
                if not item.name.startswith(".") and name.endswith(tuple(_FORMATS)):  # '.': writes under way
                    found.add(folder / name)
        return sorted(found)

    def check(self, path: Path) -> str | None:
        """Why the entry at ``path`` cannot be trusted, or None when it can."""
        if not path.exists() and not path.is_symlink():
            return "checksum file without its data"
        try:
            read_verified(path)
        except MemoryError:
            raise
        except Exception as exc:
            return _reason(exc)
        return None

    def last_used(self, path: Path) -> float:
        """When the entry was last written or read by a run (seconds since the epoch)."""
        return max(_mtime(path), _mtime(checksum_path(path)))

    def usage(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) per kind; for ``quarantine`` and ``scratch`` (folders, bytes)."""
        assert self.root is not None
        entries = self.entries()
        out = {}
        for folder in self._kind_dirs():
            out[folder.name] = (sum(p.parent == folder for p in entries), _tree_size(folder)[1])
        for name in (QUARANTINE, SCRATCH):
            folder = self.root / name
            if folder.is_dir():
                out[name] = (sum(1 for _ in folder.iterdir()), _tree_size(folder)[1])
        return out

    def prune(self, older_than_days: float | None = None) -> tuple[int, int]:
        """Delete ``quarantine/``, ``scratch/``, temporary files of dead writes and, with
        ``older_than_days``, entries no run has written or read for that long; (files, bytes) freed."""
        assert self.root is not None
        freed = [_remove(self.root / name) for name in (QUARANTINE, SCRATCH)]
        now = time.time()
        freed += [_remove(tmp) for tmp in self.root.rglob(".*.tmp") if now - _mtime(tmp) > STALE_TEMP_SECONDS]
        if older_than_days is not None:
            cutoff = now - older_than_days * 86400
            for path in self.entries():
                if self.last_used(path) < cutoff:
                    freed += [_remove(path), _remove(checksum_path(path))]
        return sum(f for f, _ in freed), sum(b for _, b in freed)
