"""Users' own data: ``.npz`` archives of images, read from disk."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from oodbench.api import Dataset, DatasetContext, ImageSet, MissingDataError, PluginError, files_sha256

from .convert import to_format


class NpzImages(Dataset):
    """Images from ``.npz`` files holding ``x`` (uint8, N x H x W x C) and optional ``y`` (int).

    As in-distribution data, give one file per split (``train``, ``val``, ``test``; ``val``
    may be carved from the end of train with ``val_from_train``). As a failure source, give
    ``test``; images are converted to the in-distribution format (luma for RGB -> grey,
    repetition for grey -> RGB, antialiased resize). Relative paths are read from
    ``--data-dir``. ``limit`` keeps the first N images of each split.
    """

    name = "npz"
    splits = ("train", "val", "test")

    def __init__(self, *, train: str = "", val: str = "", test: str = "", val_from_train: int = 0,
                 num_classes: int = 0, limit: int = 0):
        self.paths = {"train": train, "val": val, "test": test}
        self.val_from_train = val_from_train
        self.num_classes = num_classes
        self.limit = limit

    def _read(self, ctx: DatasetContext, split: str) -> tuple[np.ndarray, np.ndarray | None]:
        given = self.paths.get(split, "")
        if not given:
            raise PluginError(f"npz dataset: no file given for split '{split}' (option '{split}')")
        path = _resolve(given, ctx.data_dir)
        if not path.exists():
            raise MissingDataError(f"npz dataset: file for split '{split}' not found: {path} (set --data-dir or the '{split}' option)")
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise PluginError(f"{path}: no array 'x' (found {data.files})")
            x, y = data["x"], (data["y"] if "y" in data.files else None)
        if x.dtype != np.uint8 or x.ndim != 4:
            raise PluginError(f"{path}: 'x' must be uint8 N x H x W x C, got {x.dtype} {x.shape}")
        return x.transpose(0, 3, 1, 2), y

    def fingerprint(self, data_dir: Path) -> str:
        """The sha256 of the split files' contents (and names), as given."""
        return files_sha256(_resolve(given, data_dir) for given in self.paths.values() if given)

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.split == "val" and not self.paths["val"]:
            if not self.val_from_train:
                raise PluginError("npz dataset: give a 'val' file or 'val_from_train = N'")
            x, y = self._read(ctx, "train")
            x, y = x[-self.val_from_train:], (None if y is None else y[-self.val_from_train:])
        else:
            x, y = self._read(ctx, ctx.split)
            if ctx.split == "train" and self.val_from_train:
                x, y = x[:-self.val_from_train], (None if y is None else y[:-self.val_from_train])
        if self.limit:
            x, y = x[:self.limit], (None if y is None else y[:self.limit])
        if ctx.image_shape is not None:
            x, y = to_format(x, ctx.image_shape), None
        num_classes = self.num_classes or (int(y.max()) + 1 if y is not None and len(y) else None)
        name = Path(self.paths[ctx.split] or self.paths["train"]).stem
        return ImageSet(np.ascontiguousarray(x), None if y is None else y.astype(np.int64), name, num_classes)


def _resolve(given: str, data_dir: Path) -> Path:
    """A split's file: as given when absolute, else under ``--data-dir``."""
    path = Path(given).expanduser()
    return path if path.is_absolute() else Path(data_dir) / path
