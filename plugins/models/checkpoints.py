"""Loading external classifier weights safely: shared by the checkpoint-reading model plugins."""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from oodbench.api import MissingDataError, PluginError


#: Weights shipped inside this package (``builtin:NAME`` in a ``checkpoint``/``weights`` option).
BUILTIN_WEIGHTS = Path(__file__).resolve().parent / "weights"
BUILTIN_PREFIX = "builtin:"


def checkpoint_path(plugin: str, checkpoint: str, data_dir: Path) -> Path:
    """``checkpoint`` as an existing path; relative paths are read from ``data_dir`` (``--data-dir``).

    ``builtin:NAME`` names a file shipped with the built-in plugins (``oodbench_plugins/models/weights``),
    so a benchmark file can point at weights that install with the package.
    Raises ``MissingDataError`` naming the resolved path when the file is not there.
    """
    if checkpoint.startswith(BUILTIN_PREFIX):
        path = BUILTIN_WEIGHTS / checkpoint[len(BUILTIN_PREFIX):]
    else:
        path = Path(checkpoint).expanduser()
        if not path.is_absolute():
            path = data_dir / path
    if not path.exists():
        raise MissingDataError(f"{plugin} checkpoint not found: {path} (set --data-dir or give an absolute path)")
    return path


def file_sha256(path: Path) -> str:
    """The checkpoint's content hash: what a model's ``fingerprint`` returns, so new weights mean new cache keys."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checked_sha256(plugin: str, path: Path, expected: str) -> str:
    """The file's sha256, after checking it against ``expected`` (when given): a changed file is an error."""
    actual = file_sha256(path)
    if expected and actual != expected.lower():
        raise PluginError(f"{plugin}: {path} has sha256 {actual}, but the benchmark expects {expected}: "
                          "the weights are not the ones the benchmark was published with")
    return actual


def load_checkpoint(network: nn.Module, path: Path, what: str, seed: int | None = None) -> None:
    """Load the weights in ``path`` into ``network`` in place, strictly.

    The file is read with ``torch.load(weights_only=True)``, so no code in it runs (a whole
    pickled model cannot be read this way: save its ``state_dict()`` instead). It holds a state
    dict, or a dict with one under ``state_dict``, or one per seed under ``seeds`` (keys ``"0"``,
    ``"1"``, ...: what ``oodbench train --seeds N --export FILE`` writes), of which ``seed``'s
    is loaded; a ``module.`` prefix (``DataParallel``) is
    stripped from every key. The network's own ``mean``/``std`` normalisation buffers win over
    any in the file (external checkpoints have none; the plugin's ``normalisation`` option
    sets them). Every other key and shape must match: ``PluginError`` naming the file and
    ``what`` it should have been otherwise.
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError) as exc:
        raise PluginError(f"{path}: cannot be read as weights only ({str(exc).splitlines()[0]}); "
                          "save the state dict (model.state_dict()), not the whole model") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("seeds"), Mapping):
        per_seed = loaded["seeds"]
        if seed is None or str(seed) not in per_seed:
            have = ", ".join(sorted(per_seed, key=lambda s: int(s) if s.isdigit() else -1))
            raise PluginError(f"{path} holds weights for seeds {have} only, not seed {seed}; "
                              "choose seeds among them or train the network (a benchmark without these weights)")
        loaded = per_seed[str(seed)]
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, Mapping):
        raise PluginError(f"{path}: not a {what} checkpoint: holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state.update(mean=network.mean, std=network.std)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PluginError(f"{path}: not a {what} checkpoint: {str(exc).splitlines()[0]}") from None
