"""A content-addressed store: key -> arrays or a torch state dict, written atomically and verified on read.

A key is the hash of a JSON description of everything that determines the value (plugin
names, versions, options, seeds, and the keys of the inputs), so equal work is found
again across runs and a killed run resumes where it stopped: a task whose output is
already stored is not run again.

Layout under the root: ``<kind>/<key>.npz`` (arrays) or ``<kind>/<key>.pt`` (a state dict),
``kind`` being the key's prefix, each with a checksum file ``<key>.npz.json`` beside it:
the sha256 and length of the data file's bytes, and per array (tensor) name its shape and
dtype. ``scratch/`` holds work in progress, ``quarantine/`` entries that failed their check.
Only safe formats are read back: ``.npz`` without pickles, state dicts with ``weights_only``.

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

Where the store lives: a local folder (the default: ``$OODBENCH_CACHE_DIR`` or the user
cache folder; a shared NFS mount is one too) or any fsspec URL (``s3://bucket/oodbench``,
``gs://...``; ``file://`` URLs are local folders), so that the machines of a cluster share
one store. Layout, checksum files, verification and quarantine are the same in both; what
differs is how a file is written and a few things an object store cannot do:

- A local file is written to a temporary file beside it, then renamed over its name. A
  rename is atomic: readers see the old file or the new one, never half of one. A
  temporary file left by a killed write is removed by ``oodbench cache prune``.
- On an object store a file is written by ONE put of its complete bytes, serialised and
  hashed in memory first (so storing an entry holds it in memory twice). An object store
  shows an object only once its upload has completed, a multipart upload included, and a
  put replaces an object whole: one put is as atomic as a rename, and leaves no temporary
  file behind. The data is put before its checksum file, as locally.
- An object's modification time changes only by writing it, so a read marks an entry as
  used by putting its checksum file again, the same bytes (the age ``prune --older-than``
  goes by). Should another run rewrite the entry in between, the old checksum file no
  longer matches the new data: recomputed once, never a wrong value.
- ``scratch/`` (a model's per-epoch training state, for resuming an interrupted training)
  stays on this machine, under the local cache folder: it is written every epoch and of
  use only where the training ran.
- ``memory://`` (tests) lives in one process: workers of a process executor do not share it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import secrets
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
# 'scheme://' starts an fsspec URL; anything else is a local path.
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

#: A file or folder of a store: a Path in a local folder, a URL string in any other filesystem.
Location = Path | str


class CacheWarning(UserWarning):
    """A cache entry was set aside or could not be stored; the run goes on without it."""


def is_url(root: object) -> bool:
    """Whether ``root`` is an fsspec URL (``s3://bucket/x``) rather than a local path."""
    return isinstance(root, str) and _URL.match(root) is not None


def local_cache_dir() -> Path:
    """The local cache folder: ``$OODBENCH_CACHE_DIR`` when it is a path, else the user cache folder."""
    env = os.environ.get("OODBENCH_CACHE_DIR")
    return Path(env) if env and not is_url(env) else Path(platformdirs.user_cache_dir("oodbench"))


def default_cache_dir() -> Path | str:
    """The store a command uses without ``--cache-dir``: ``$OODBENCH_CACHE_DIR`` (a folder or a URL), else the
    user cache folder."""
    env = os.environ.get("OODBENCH_CACHE_DIR")
    return env if is_url(env) else local_cache_dir()


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


def checksum_path(path: Location) -> Location:
    """The checksum file that vouches for the entry at ``path``."""
    return path.with_name(path.name + CHECKSUM_SUFFIX) if isinstance(path, Path) else path + CHECKSUM_SUFFIX


def _one_line(text: str, limit: int = 200) -> str:
    # Exception texts can span lines; the warning must stay one line.
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _reason(exc: Exception) -> str:
    return _one_line(str(exc) if isinstance(exc, Damaged) else f"{type(exc).__name__}: {exc}")


def _parse_record(text: bytes) -> dict[str, Any]:
    try:
        record = json.loads(text.decode())
    except ValueError as exc:  # bad JSON or bad UTF-8
        raise Damaged(f"unreadable checksum file: {exc}") from None
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or not isinstance(record.get("sha256"), str) or not isinstance(record.get("bytes"), int)
            or not isinstance(record.get("members"), dict)):
        raise Damaged("invalid checksum file")
    return record


# The two kinds of store: the same operations on a local folder (Path) and on an fsspec filesystem (URL).
# The Cache above them holds every decision (layout, verification, quarantine, what prune removes).

class _Folder:
    """A local folder: each file written through a temporary file beside it and a rename."""

    def __init__(self, root: Path):
        self.root = root
        self.scratch = root / SCRATCH

    def join(self, base: Path, *names: str) -> Path:
        return base.joinpath(*names)

    def exists(self, path: Path, follow_symlinks: bool = True) -> bool:
        return path.exists() or (not follow_symlinks and path.is_symlink())

    def is_file(self, path: Path) -> bool:
        return path.is_file()

    def is_dir(self, path: Path) -> bool:
        return path.is_dir()

    def read(self, path: Path) -> bytes:
        return path.read_bytes()

    def write(self, path: Path, save: Callable[[BinaryIO], None]) -> tuple[str, int]:
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

    def children(self, folder: Path) -> list[tuple[str, bool]]:
        """(name, is a folder) of each thing in ``folder``, none if it is no folder; a link is never a folder."""
        if not folder.is_dir():
            return []
        return [(item.name, item.is_dir() and not item.is_symlink()) for item in folder.iterdir()]

    def new_folder(self, parent: Path, prefix: str) -> Path:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=parent, prefix=prefix))

    def move_into(self, path: Path, folder: Path) -> None:
        try:
            os.replace(path, folder / path.name)
        except FileNotFoundError:  # never written, or set aside by a concurrent run
            pass

    def mark_used(self, path: Path, data: bytes) -> None:
        os.utime(path)

    def mtime(self, path: Path) -> float:
        """Modification time, 0 for something absent (never written, or removed meanwhile)."""
        try:
            return path.lstat().st_mtime
        except FileNotFoundError:
            return 0.0

    def size(self, path: Path) -> tuple[int, int]:
        """(files, bytes) at ``path``: one file, or every file under a folder."""
        if path.is_symlink() or not path.is_dir():
            return 1, path.lstat().st_size
        files = [p for p in path.rglob("*") if p.is_symlink() or p.is_file()]
        return len(files), sum(p.lstat().st_size for p in files)

    def remove(self, path: Path) -> tuple[int, int]:
        """Delete a file or folder; the (files, bytes) it held. Something already gone counts nothing."""
        try:
            counted = self.size(path)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:  # removed meanwhile by another run or prune
            return 0, 0
        return counted

    def stale_temps(self, now: float) -> list[Path]:
        """Temporary files of writes that died."""
        return [tmp for tmp in self.root.rglob(".*.tmp") if now - self.mtime(tmp) > STALE_TEMP_SECONDS]


class _Remote:
    """Any other fsspec filesystem (an object store): each file written by one put of its complete bytes."""

    def __init__(self, fs: Any, url: str):
        self.fs, self.root = fs, url.rstrip("/")
        self.scratch = local_cache_dir() / SCRATCH  # per-epoch training state stays where the training runs

    def join(self, base: str, *names: str) -> str:
        return "/".join((base, *names))

    def exists(self, path: str, follow_symlinks: bool = True) -> bool:
        return self.fs.exists(path)

    def is_file(self, path: str) -> bool:
        return self.fs.isfile(path)

    def is_dir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write(self, path: str, save: Callable[[BinaryIO], None]) -> tuple[str, int]:
        """One put of the complete bytes (atomic on an object store); their sha256 and length."""
        buffer = io.BytesIO()
        save(buffer)
        data = buffer.getvalue()
        self.fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest(), len(data)

    def children(self, folder: str) -> list[tuple[str, bool]]:
        if not self.fs.isdir(folder):  # ls of a file lists the file itself
            return []
        return [(posixpath.basename(info["name"].rstrip("/")), info["type"] == "directory")
                for info in self.fs.ls(folder, detail=True)]

    def new_folder(self, parent: str, prefix: str) -> str:
        # Folders on an object store are the shared beginnings of their files' names: nothing to create.
        return self.join(parent, prefix + secrets.token_hex(4))

    def move_into(self, path: str, folder: str) -> None:
        try:
            self.fs.mv(path, self.join(folder, posixpath.basename(path)), recursive=True)
        except FileNotFoundError:  # never written, or set aside by a concurrent run
            pass

    def mark_used(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(path, data)  # an object's modification time changes only when it is written

    def mtime(self, path: str) -> float:
        try:
            return self.fs.modified(path).timestamp()
        except FileNotFoundError:
            return 0.0
        except NotImplementedError:
            raise ValueError(f"{self.root}: this filesystem keeps no modification times, so the age of "
                             "entries is unknown") from None

    def size(self, path: str) -> tuple[int, int]:
        found = self.fs.find(path, detail=True)
        return len(found), sum(info.get("size") or 0 for info in found.values())

    def remove(self, path: str) -> tuple[int, int]:
        counted = self.size(path)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:  # removed meanwhile by another run or prune
            return 0, 0
        return counted

    def stale_temps(self, now: float) -> list[str]:
        return []  # one put per file: no write leaves a temporary file behind


def _store_at(root: Path | str) -> _Folder | _Remote:
    """The store at ``root``: a local folder for a path or a ``file://`` URL, else its fsspec filesystem.

    An unknown URL scheme, or one whose filesystem package is not installed, raises ValueError in one line.
    """
    if not is_url(root):
        return _Folder(Path(root))
    try:
        import fsspec
        from fsspec.implementations.local import LocalFileSystem
    except ImportError:
        raise ValueError(f"{root}: a URL store needs the fsspec package (pip install fsspec)") from None
    try:
        fsspec.get_filesystem_class(fsspec.core.split_protocol(root)[0])  # unknown or not installed: a clear line
        fs, path = fsspec.core.url_to_fs(root)
    except (ImportError, ValueError) as exc:
        raise ValueError(f"{root}: {_one_line(str(exc))}") from None
    # A file:// URL keeps the local folder's temporary file and rename, which fsspec's local filesystem lacks.
    return _Folder(Path(path)) if isinstance(fs, LocalFileSystem) else _Remote(fs, root)


def check_store(option: str, root: str) -> Path | str:
    """Before any work: the URL ``root`` names an installed filesystem that can be reached.

    Returns a local Path for a ``file://`` URL (to be checked as a local folder), else ``root``.
    The location, or else the nearest folder above it that exists (an object store makes folders
    with their first file), must be a folder that can be listed: that proves the filesystem,
    network and credentials without writing anything. Raises ValueError in one line.
    """
    try:
        store = _store_at(root)
    except ValueError as exc:
        raise ValueError(f"{option} {exc}") from None
    if isinstance(store, _Folder):
        return store.root
    fs, path = store.fs, store.fs._strip_protocol(root)
    try:
        while not fs.exists(path):
            parent = fs._parent(path)
            if parent in ("", path):
                raise ValueError(f"{option} {root}: neither it nor a folder above it exists")
            path = parent
        if not fs.isdir(path):
            raise ValueError(f"{option} {root}: {path} is a file, expected a folder")
        fs.ls(path)
    except ValueError:
        raise
    except Exception as exc:  # whatever the filesystem raises (credentials, network, permissions): unusable
        raise ValueError(f"{option} {root}: cannot be reached ({_reason(exc)})") from None
    return root


class Cache:
    """Arrays (``.npz``) and checkpoints (``.pt``) under one folder or URL, by key. ``None`` disables it.

    ``hits`` and ``misses`` count reads served and values computed; ``quarantined`` lists
    the entries set aside (file, reason, where they went) for the run's record.
    """

    def __init__(self, root: Path | str | None):
        self._store = _store_at(root) if root is not None else None
        #: a Path for a local folder, the URL for any other filesystem
        self.root = self._store.root if self._store is not None else None
        self.hits = 0
        self.misses = 0
        self.quarantined: list[dict[str, str]] = []

    def _path(self, key: str, suffix: str) -> Location:
        assert self._store is not None
        return self._store.join(self.root, key.split("-", 1)[0], f"{key}{suffix}")

    def arrays(self, key: str, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays stored under ``key``, computing and storing them first if absent or damaged."""
        return self._get(key, ".npz", compute)

    def state_dict(self, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The state dict stored under ``key``, computing and storing it first if absent or damaged."""
        return self._get(key, ".pt", compute)

    def _get(self, key: str, suffix: str, compute: Callable[[], Any]) -> Any:
        path = self._path(key, suffix) if self._store is not None else None
        if path is not None and self._store.exists(path):
            try:
                value, record = self._read_verified(path)
            except MemoryError:  # a sound entry too big for now: setting it aside would lose it
                raise
            except Exception as exc:
                self._set_aside(path, _reason(exc))
            else:
                self.hits += 1
                self._mark_used(path, record)
                return value
        self.misses += 1
        value = compute()
        if path is not None:
            self._store_value(path, value)
        return value

    def _read_verified(self, path: Location) -> tuple[Any, bytes]:
        """The value stored at ``path`` and its checksum file's bytes, checked; raises if it cannot be trusted."""
        fmt = _FORMATS[os.path.splitext(path)[1]]
        if not self._store.is_file(path):
            raise Damaged("not a regular file")
        try:
            record_bytes = self._store.read(checksum_path(path))
        except FileNotFoundError:
            raise Damaged("no checksum") from None
        record = _parse_record(record_bytes)
        data = self._store.read(path)
        if len(data) != record["bytes"]:  # before hashing: a truncated file needs no sha256 to be caught
            raise Damaged(f"{len(data)} bytes where {record['bytes']} were written")
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise Damaged("checksum mismatch: the bytes changed since they were written")
        value = fmt.load(io.BytesIO(data))
        if not isinstance(value, dict) or fmt.describe(value) != record["members"]:
            raise Damaged("the stored names, shapes or dtypes differ from the record")
        return value, record_bytes

    def _store_value(self, path: Location, value: Any) -> None:
        fmt = _FORMATS[os.path.splitext(path)[1]]
        try:
            digest, size = self._store.write(path, lambda handle: fmt.save(handle, value))
            record = {"format": RECORD_FORMAT, "sha256": digest, "bytes": size, "members": fmt.describe(value)}
            text = json.dumps(record, indent=1).encode()
            self._store.write(checksum_path(path), lambda handle: handle.write(text))
        except OSError as exc:  # a full disk or a read-only cache costs the reuse, not the run's results
            warnings.warn(f"cannot store cache entry {path} ({_reason(exc)}); going on without caching it",
                          CacheWarning, stacklevel=4)

    def _set_aside(self, path: Location, reason: str) -> None:
        try:
            folder = str(self.quarantine(path, reason))
            where = f"moved to {folder}"
        except OSError as exc:
            folder, where = "", f"could not be moved aside ({_reason(exc)})"
        self.quarantined.append({"file": str(path), "reason": reason, "moved_to": folder})
        warnings.warn(f"damaged cache entry {path} ({reason}): {where}; recomputing it", CacheWarning, stacklevel=4)

    def _mark_used(self, path: Location, record: bytes) -> None:
        # The checksum file's mtime is the entry's last use, for 'prune --older-than': access
        # times are unreliable (noatime, relatime) and reading for 'verify' would reset them.
        try:
            self._store.mark_used(checksum_path(path), record)
        except OSError:
            pass  # a read-only cache is still readable

    def quarantine(self, path: Location, reason: str) -> Location:
        """Move the entry at ``path`` and its checksum file into a new folder under ``quarantine/``.

        The folder (returned) also holds ``reason.txt``, so what went wrong survives for a
        look later; nothing in it is ever read back.
        """
        assert self._store is not None
        stamp = time.strftime("%Y%m%dT%H%M%S")
        folder = self._store.new_folder(self._store.join(self.root, QUARANTINE),
                                        f"{os.path.basename(path)}.{stamp}.")
        for part in (path, checksum_path(path)):
            self._store.move_into(part, folder)
        self._store.write(self._store.join(folder, "reason.txt"), lambda handle: handle.write(f"{reason}\n".encode()))
        return folder

    def scratch_dir(self, key: str) -> Path | None:
        """A local folder for work in progress on ``key`` (e.g. per-epoch training state); None when caching is off.

        Under the root for a local store; for a URL store, under the local cache folder
        (``local_cache_dir()/scratch``): resume state is only of use on the machine that trains.
        """
        return None if self._store is None else self._store.scratch / key

    def path_of(self, key: str, suffix: str) -> Location | None:
        """Where ``key`` is stored (``.npz`` arrays, ``.pt`` checkpoints): a Path, or the URL in a URL store;
        None when caching is off or it is absent."""
        if self._store is None:
            return None
        path = self._path(key, suffix)
        return path if self._store.exists(path) else None

    def check_root(self) -> None:
        """Refuse a root that is missing or not a folder: for the cache commands, where a typo must not read as
        'all is well'. (A run creates its store.)"""
        assert self._store is not None
        if not self._store.exists(self.root):
            raise ValueError(f"cache folder {self.root} does not exist")
        if not self._store.is_dir(self.root):
            raise ValueError(f"cache folder {self.root} is not a folder")

    def _kinds(self) -> list[str]:
        assert self._store is not None
        return sorted(name for name, is_dir in self._store.children(self.root)
                      if is_dir and name not in (QUARANTINE, SCRATCH))

    def _entries_of(self, kind: str) -> list[Location]:
        folder = self._store.join(self.root, kind)
        found = set()
        for name, _ in self._store.children(folder):
            base = name.removesuffix(CHECKSUM_SUFFIX)
            if not name.startswith(".") and base.endswith(tuple(_FORMATS)):  # '.': writes under way
                found.add(self._store.join(folder, base))
        return sorted(found)

    def entries(self) -> list[Location]:
        """Every entry's data path, damaged ones included: a folder in an entry's place, or a
        checksum file whose data is gone (the data path is then missing)."""
        return [path for kind in self._kinds() for path in self._entries_of(kind)]

    def check(self, path: Location) -> str | None:
        """Why the entry at ``path`` cannot be trusted, or None when it can."""
        if not self._store.exists(path, follow_symlinks=False):
            return "checksum file without its data"
        try:
            self._read_verified(path)
        except MemoryError:
            raise
        except Exception as exc:
            return _reason(exc)
        return None

    def last_used(self, path: Location) -> float:
        """When the entry was last written or read by a run (seconds since the epoch)."""
        return max(self._store.mtime(path), self._store.mtime(checksum_path(path)))

    def usage(self) -> dict[str, tuple[int, int]]:
        """(entries, bytes) per kind; for ``quarantine`` and ``scratch`` (folders, bytes)."""
        assert self._store is not None
        out = {kind: (len(self._entries_of(kind)), self._store.size(self._store.join(self.root, kind))[1])
               for kind in self._kinds()}
        for name in (QUARANTINE, SCRATCH):
            folder = self._store.join(self.root, name)
            if self._store.is_dir(folder):
                out[name] = (len(self._store.children(folder)), self._store.size(folder)[1])
        return out

    def prune(self, older_than_days: float | None = None) -> tuple[int, int]:
        """Delete ``quarantine/``, ``scratch/``, temporary files of dead writes and, with
        ``older_than_days``, entries no run has written or read for that long; (files, bytes) freed.

        A store whose filesystem keeps no modification times refuses an age (ValueError) before deleting anything.
        """
        assert self._store is not None
        now = time.time()
        old = []
        if older_than_days is not None:
            cutoff = now - older_than_days * 86400
            old = [path for path in self.entries() if self.last_used(path) < cutoff]
        freed = [self._store.remove(self._store.join(self.root, name)) for name in (QUARANTINE, SCRATCH)]
        freed += [self._store.remove(tmp) for tmp in self._store.stale_temps(now)]
        for path in old:
            freed += [self._store.remove(path), self._store.remove(checksum_path(path))]
        return sum(f for f, _ in freed), sum(b for _, b in freed)
