"""Standard image benchmarks read through torchvision: CIFAR-10/100, SVHN, MNIST, Fashion-MNIST.

torchvision only parses the files (and downloads them when asked); images come out of its
``data`` arrays directly, without its per-image PIL path. Every class shares the options
``root``, ``download``, ``val_size`` and ``limit`` (see ``_TorchvisionSet``).
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from oodbench.api import Dataset, DatasetContext, ImageSet, MissingDataError, PluginError, files_sha256

from .convert import to_format


def _non_negative_int(plugin: str, option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PluginError(f"{plugin}: option '{option}' must be an integer >= 0, got {value!r}")
    return value


def _reindex(labels: np.ndarray, classes: tuple[int, ...]) -> np.ndarray:
    """Label c -> its position in ``classes``: a classifier on a subset has no dead outputs."""
    lookup = np.full(max(classes) + 1, -1, np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    return lookup[labels]


class _TorchvisionSet(Dataset):
    """Common to the torchvision-backed sets.

    ``root``: the folder torchvision reads (default ``""``: ``--data-dir``; relative paths
    start at ``--data-dir``). ``download``: let torchvision fetch missing files into ``root``.
    As in-distribution data the splits are ``train`` (the training set minus its last
    ``val_size`` images), ``val`` (those last ``val_size`` images) and ``test`` (the official
    test set). As a failure source the test set is converted to the in-distribution format
    (``convert.to_format``) and its labels are dropped. ``limit`` keeps the first N images of
    the split. Held-out classes (ODIN's CIFAR-80/CIFAR-20): ``classes`` keeps only those
    labels, re-indexed 0..len(classes)-1 in the given order (``val`` is then the last
    ``val_size`` of the kept training images); with ``complement = true`` it keeps every other
    class instead, the unseen classes of a failure source.
    """

    splits = ("train", "val", "test")
    #: the torchvision.datasets class that parses the files
    torchvision_class: ClassVar[str] = ""
    num_classes: ClassVar[int] = 10

    def __init__(self, *, root: str = "", download: bool = False, val_size: int = 5000, limit: int = 0,
                 classes: tuple[int, ...] | list[int] = (), complement: bool = False):
        if not isinstance(root, str):
            raise PluginError(f"{self.name}: option 'root' must be a string (a folder), got {root!r}")
        if not isinstance(download, bool):
            raise PluginError(f"{self.name}: option 'download' must be true or false, got {download!r}")
        self.root = root
        self.download = download
        self.val_size = _non_negative_int(self.name, "val_size", val_size)
        self.limit = _non_negative_int(self.name, "limit", limit)
        self.classes = tuple(_non_negative_int(self.name, "classes", c) for c in classes)
        if len(set(self.classes)) != len(self.classes) or any(c >= self.num_classes for c in self.classes):
            raise PluginError(f"{self.name}: option 'classes' must be distinct labels in 0..{self.num_classes - 1}, "
                              f"got {list(classes)}")
        if complement and not self.classes:
            raise PluginError(f"{self.name}: complement = true needs the 'classes' to leave out")
        self.complement = bool(complement)

    # -- where the files are -------------------------------------------------------------
    def _root(self, data_dir: Path) -> Path:
        if not self.root:
            return Path(data_dir)
        path = Path(self.root).expanduser()
        return path if path.is_absolute() else Path(data_dir) / path

    def fingerprint(self, data_dir: Path) -> str:
        """The sha256 of the files torchvision reads for the train and test sets (names and contents)."""
        root = self._root(data_dir)
        files = dict.fromkeys(f for train in (True, False) for f in self._expected(root, train)[1])
        return files_sha256(files, root=root)

    def _tv_class(self) -> type:
        import torchvision.datasets

        return getattr(torchvision.datasets, self.torchvision_class)

    def _expected(self, root: Path, train: bool) -> tuple[Path, list[Path]]:
        """(the folder torchvision reads, the files it requires there) for the train or test set."""
        raise NotImplementedError

    def _parse(self, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        """uint8 N x C x H x W images and int64 labels, parsed by torchvision."""
        raise NotImplementedError

    def _read(self, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        folder, files = self._expected(root, train)
        if not self.download:
            missing = [f for f in files if not f.is_file()]
            if missing:
                shown = ", ".join(str(f.relative_to(folder)) for f in missing)
                raise MissingDataError(
                    f"{self.name}: {len(missing)} of the {len(files)} files torchvision reads are missing from "
                    f"{folder}: {shown}. Pass `download = true` in the dataset's options to fetch them, or put "
                    f"the files there (the folder is under the option 'root', default --data-dir).")
        try:
            return self._parse(root, train)
        except Exception as exc:  # torchvision's RuntimeError/URLError/AssertionError, pickle errors, ...
            what = "download or read" if self.download else "read"
            raise PluginError(
                f"{self.name}: torchvision could not {what} the files in {folder} "
                f"({type(exc).__name__}: {exc}). A file that fails torchvision's md5 check is corrupted or "
                f"a different release: delete it and pass `download = true`, or replace it.") from exc

    # -- splits ---------------------------------------------------------------------------
    def load(self, ctx: DatasetContext) -> ImageSet:
        as_source = ctx.image_shape is not None
        split = "test" if as_source else ctx.split
        if split not in self.splits:
            raise PluginError(f"{self.name} has splits {self.splits}, not '{split}'")
        if split == "val" and not self.val_size:
            raise PluginError(f"{self.name}: val_size = 0 leaves no validation split; set val_size > 0")
        x, y = self._read(self._root(ctx.data_dir), train=split != "test")
        if self.classes:
            keep = np.isin(y, self.classes) != self.complement
            x, y = x[keep], y[keep]
            if not self.complement:
                y = _reindex(y, self.classes)
        if split != "test":
            if self.val_size >= len(x):
                raise PluginError(f"{self.name}: val_size = {self.val_size} must be smaller than the "
                                  f"{len(x)} training images")
            cut = len(x) - self.val_size
            x, y = (x[:cut], y[:cut]) if split == "train" else (x[cut:], y[cut:])
        if self.limit:
            x, y = x[:self.limit], y[:self.limit]
        if as_source:
            return ImageSet(to_format(x, ctx.image_shape), None, self.name)
        if self.complement:
            raise PluginError(f"{self.name}: complement = true selects unseen classes; use it as a failure source")
        classes = len(self.classes) or self.num_classes
        return ImageSet(np.ascontiguousarray(x), y.astype(np.int64), self.name, classes)


class _Cifar(_TorchvisionSet):
    def _expected(self, root: Path, train: bool) -> tuple[Path, list[Path]]:
        cls = self._tv_class()
        folder = root / cls.base_folder
        # torchvision checks every batch's md5 (train and test) and the meta file's, whichever set is read.
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        return folder, [folder / n for n in names]

    def _parse(self, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        ds = self._tv_class()(str(root), train=train, download=self.download)
        return np.asarray(ds.data, np.uint8).transpose(0, 3, 1, 2), np.asarray(ds.targets, np.int64)


class CIFAR10(_Cifar):
    """CIFAR-10 (Krizhevsky 2009) via torchvision: 32x32 colour images, 10 classes; 45,000/5,000/10,000.

    torchvision reads ``ROOT/cifar-10-batches-py/`` (the extracted "python version" archive:
    ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``) and checks the md5
    of all seven files, whichever split is asked for. ``val`` is the last ``val_size`` (5,000)
    of the 50,000 training images in file order (the tail of ``data_batch_5``), ``train`` the
    first 45,000, ``test`` the official 10,000. As a failure source: the 10,000 test images,
    converted to the in-distribution format, no labels. Options: ``root`` (default
    ``--data-dir``), ``download``, ``val_size``, ``limit`` (first N of the split).
    """

    name = "cifar10"
    torchvision_class = "CIFAR10"
    num_classes = 10


class CIFAR100(_Cifar):
    """CIFAR-100 via torchvision: 32x32 colour images, 100 fine classes; 45,000/5,000/10,000.

    torchvision reads ``ROOT/cifar-100-python/`` (``train``, ``test``, ``meta``) and checks
    their md5. Labels are the 100 fine labels (the 20 coarse superclasses are not used).
    Splits, failure-source conversion and options as ``cifar10``: ``val`` is the last
    ``val_size`` (5,000) training images in file order.
    """

    name = "cifar100"
    torchvision_class = "CIFAR100"
    num_classes = 100


class SVHN(_TorchvisionSet):
    """SVHN cropped digits (Netzer et al. 2011) via torchvision: 32x32 colour, 10 classes; 68,257/5,000/26,032.

    torchvision reads ``ROOT/train_32x32.mat`` and ``ROOT/test_32x32.mat`` (directly in
    ``root``, no subfolder; only the file of the asked set must be present) and checks its
    md5; it maps the files' label 10 to digit 0. The 531,131 "extra" images are not used.
    ``val`` is the last ``val_size`` (5,000) of the 73,257 training images in file order.
    As a failure source: the 26,032 test images, converted to the in-distribution format.
    Options: ``root`` (default ``--data-dir``), ``download``, ``val_size``, ``limit``.
    """

    name = "svhn"
    torchvision_class = "SVHN"
    num_classes = 10

    def _expected(self, root: Path, train: bool) -> tuple[Path, list[Path]]:
        return root, [root / self._tv_class().split_list["train" if train else "test"][1]]

    def _parse(self, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        ds = self._tv_class()(str(root), split="train" if train else "test", download=self.download)
        return np.asarray(ds.data, np.uint8), np.asarray(ds.labels, np.int64)


class _Mnist(_TorchvisionSet):
    def _expected(self, root: Path, train: bool) -> tuple[Path, list[Path]]:
        cls = self._tv_class()
        legacy = root / cls.__name__ / "processed"
        if all((legacy / f).is_file() for f in (cls.training_file, cls.test_file)):
            return legacy, [legacy / cls.training_file, legacy / cls.test_file]  # old torchvision's cache, read first
        folder = root / cls.__name__ / "raw"
        # torchvision requires all four uncompressed idx files (existence only, no md5 on them).
        return folder, [folder / Path(name).stem for name, _ in cls.resources]

    def _parse(self, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray]:
        ds = self._tv_class()(str(root), train=train, download=self.download)
        return ds.data.numpy()[:, None], ds.targets.numpy().astype(np.int64)


class MNIST(_Mnist):
    """MNIST handwritten digits (LeCun et al. 1998) via torchvision: 28x28 grey, 10 classes; 55,000/5,000/10,000.

    torchvision reads the four uncompressed idx files in ``ROOT/MNIST/raw/``
    (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``; its download fetches and extracts the ``.gz`` archives) and
    only checks that they exist. ``val`` is the last ``val_size`` (5,000) of the 60,000
    training images in file order. As a failure source: the 10,000 test images, converted to
    the in-distribution format (grey repeated to RGB, antialiased resize). Options: ``root``
    (default ``--data-dir``), ``download``, ``val_size``, ``limit``.
    """

    name = "mnist"
    torchvision_class = "MNIST"


class FashionMNIST(_Mnist):
    """Fashion-MNIST (Xiao et al. 2017) via torchvision: 28x28 grey clothing, 10 classes; 55,000/5,000/10,000.

    torchvision reads the four uncompressed idx files in ``ROOT/FashionMNIST/raw/`` (same
    names as MNIST's) and only checks that they exist. Splits, failure-source conversion and
    options as ``mnist``: ``val`` is the last ``val_size`` (5,000) training images in file order.
    """

    name = "fashion-mnist"
    torchvision_class = "FashionMNIST"
