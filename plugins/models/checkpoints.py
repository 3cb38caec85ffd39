"""Loading external classifier weights safely: shared by the checkpoint-reading model plugins."""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn

from oodbench.api import MissingDataError, PluginError


def checkpoint_path(plugin: str, checkpoint: str, data_dir: Path) -> Path:
    """``checkpoint`` as an existing path; relative paths are read from ``data_dir`` (``--data-dir``).

    Raises ``MissingDataError`` naming the resolved path when the file is not there.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_absolute():
        path = data_dir / path
    if not path.exists():
        raise MissingDataError(f"{plugin} checkpoint not found: {path} (set --data-dir or give an absolute path)")
    return path


def file_sha256(path: Path) -> str:
    """The checkpoint's content hash: what a model's ``fingerprint`` returns, so new weights mean new cache keys."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(network: nn.Module, path: Path, what: str) -> None:
    """Load the weights in ``path`` into ``network`` in place, strictly.

    The file is read with ``torch.load(weights_only=True)``, so no code in it runs (a whole
    pickled model cannot be read this way: save its ``state_dict()`` instead). It holds a state
    dict, or a dict with one under ``state_dict``; a ``module.`` prefix (``DataParallel``) is
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
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state, Mapping):
        raise PluginError(f"{path}: not a {what} checkpoint: holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state.update(mean=network.mean, std=network.std)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PluginError(f"{path}: not a {what} checkpoint: {str(exc).splitlines()[0]}") from None
