"""Users' own image files: a folder with one subfolder per class, or a flat folder of images.

Also the ODIN paper's released out-of-distribution folders (Liang et al., ICLR 2018), which
use the same layout: each archive extracts to one folder holding one subfolder of images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import numpy as np

from oodbench.api import Dataset, DatasetContext, ImageSet, MissingDataError, PluginError, files_sha256

from .convert import to_format

#: the extensions torchvision.datasets.ImageFolder accepts (compared case-insensitively)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: fixed seed of the permutation behind ``val_from_train`` and ``limit``; part of the data's definition, not of the run
SPLIT_SEED = 0


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def scan(folder: Path) -> tuple[list[Path], list[str] | None, list[int] | None]:
    """(image files, class names, label of each file) in ImageFolder's order; classes None for a flat folder.

    Class layout: classes are the sorted names of the subfolders, files are every image below
    each class folder (recursively, symlinks followed), walked and sorted as
    ``torchvision.datasets.ImageFolder`` does. Flat layout: the sorted image files of
    ``folder``. Names starting with "." are skipped.
    """
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    dirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = [Path(e.path) for e in entries if e.is_file() and _is_image(e.name)]
    if files and dirs:
        raise PluginError(f"{folder} holds both images and subfolders ({', '.join(dirs[:3])}): give either one "
                          "subfolder per class or a flat folder of images")
    if files:
        return files, None, None
    if not dirs:
        raise PluginError(f"{folder} holds no images ({', '.join(IMG_EXTENSIONS)}) and no class subfolders")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(dirs):
        found = [Path(top) / f for top, _, names in sorted(os.walk(folder / name, followlinks=True))
                 if not any(part.startswith(".") for part in Path(top).relative_to(folder).parts)
                 for f in sorted(names) if _is_image(f)]
        if not found:
            raise PluginError(f"class folder {folder / name} holds no images ({', '.join(IMG_EXTENSIONS)})")
        paths += found
        labels += [label] * len(found)
    return paths, dirs, labels


def read_image(path: Path, mode: str) -> np.ndarray:
    """One image as uint8 C x H x W, converted with PIL to ``mode`` ("RGB" or "L"; alpha is dropped)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):
                raise PluginError(f"{path}: {image.mode} images (16/32-bit) are not supported; save 8-bit images")
            array = np.asarray(image.convert(mode), dtype=np.uint8)
    except PluginError:
        raise
    except Exception as exc:  # PIL's UnidentifiedImageError, truncated files, ...
        raise PluginError(f"{path}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def fixed_pick(n: int, k: int) -> np.ndarray:
    """Indices of ``k`` of ``n`` items chosen by a fixed permutation (seed ``SPLIT_SEED``), ascending."""
    return np.sort(np.random.default_rng(SPLIT_SEED).permutation(n)[:k])


class FolderImages(Dataset):
    """Images from folders: one subfolder per class (ImageFolder layout) or a flat folder (OOD only).

    Class layout (``torchvision.datasets.ImageFolder``'s): labels are the indices of the
    sorted subfolder names of the ``train`` folder; ``val``/``test`` subfolders are matched by
    name, so a test folder missing a class keeps the same labels. Files are every image
    (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp) below a class folder, in
    ImageFolder's order (by class, then sorted path); names starting with "." are skipped.
    A flat folder of images has no labels and serves as a failure source only.

    Images are read with PIL and converted to ``mode`` ("RGB" default, or "L"; alpha dropped,
    16-bit images refused). As in-distribution data every image of a split must have the
    size of the first training image. As a failure source the ``test`` folder's images (of
    any sizes, labels dropped) are converted to the in-distribution format with
    ``convert.to_format`` (luma for RGB -> grey, antialiased resize). Folders: ``train``,
    ``val``, ``test``, relative to ``--data-dir``. ``val_from_train = N`` holds out N
    training images instead of a ``val`` folder and ``limit = N`` keeps N images of a split;
    both pick by a fixed permutation (seed 0, the same for every run seed) and keep file
    order, since the first or last files of a class layout are all of one class.
    """

    name = "image-folder"
    splits = ("train", "val", "test")

    def __init__(self, *, train: str = "", val: str = "", test: str = "", val_from_train: int = 0,
                 limit: int = 0, mode: str = "RGB"):
        for option, value in (("val_from_train", val_from_train), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PluginError(f"{self.name}: option '{option}' must be an integer >= 0, got {value!r}")
        if mode not in ("RGB", "L"):
            raise PluginError(f"{self.name}: option 'mode' must be \"RGB\" or \"L\", got {mode!r}")
        if val and val_from_train:
            raise PluginError(f"{self.name}: give either a 'val' folder or 'val_from_train', not both")
        self.paths = {"train": train, "val": val, "test": test}
        self.val_from_train = val_from_train
        self.limit = limit
        self.mode = mode

    def _folder(self, ctx: DatasetContext, split: str) -> Path:
        given = self.paths.get(split, "")
        if not given:
            raise PluginError(f"{self.name}: no folder given for split '{split}' (option '{split}')")
        path = Path(given).expanduser()
        path = path if path.is_absolute() else Path(ctx.data_dir) / path
        if not path.is_dir():
            raise self._missing(path, split)
        return path

    def fingerprint(self, data_dir: Path) -> str:
        """The sha256 of every image file of the given folders (paths relative to each folder, contents)."""
        digests = []
        for given in self.paths.values():
            if given:
                path = Path(given).expanduser()
                folder = path if path.is_absolute() else Path(data_dir) / path
                files = scan(folder)[0] if folder.is_dir() else [folder]
                digests.append(files_sha256(files, root=folder))
        return files_sha256([]) if not digests else "-".join(digests)

    def _missing(self, path: Path, split: str) -> MissingDataError:
        return MissingDataError(f"{self.name}: folder for split '{split}' not found: {path} "
                                f"(set --data-dir or the '{split}' option)")

    def _select(self, ctx: DatasetContext, split: str) -> tuple[Path, list[Path], list[str] | None, list[int] | None]:
        """The folder, files, class names and labels of ``split`` after val_from_train and limit."""
        source = "train" if split == "val" and not self.paths["val"] else split
        if source != split and not self.val_from_train:
            raise PluginError(f"{self.name}: give a 'val' folder or 'val_from_train = N'")
        folder = self._folder(ctx, source)
        files, classes, labels = scan(folder)
        keep = np.arange(len(files))
        if source == "train" and self.val_from_train:
            if self.val_from_train >= len(files):
                raise PluginError(f"{self.name}: val_from_train = {self.val_from_train} must be smaller than the "
                                  f"{len(files)} images in {folder}")
            held_out = fixed_pick(len(files), self.val_from_train)
            keep = held_out if split == "val" else np.setdiff1d(keep, held_out)
        if self.limit and self.limit < len(keep):
            keep = keep[fixed_pick(len(keep), self.limit)]
        return (folder, [files[i] for i in keep], classes,
                None if labels is None else [labels[i] for i in keep])

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.image_shape is not None:
            folder, files, _, _ = self._select(ctx, "test")
            images = [read_image(f, self.mode) for f in files]
            x = np.empty((len(images), *ctx.image_shape), np.uint8)
            for shape in sorted({im.shape for im in images}):  # one to_format call per distinct size
                index = [i for i, im in enumerate(images) if im.shape == shape]
                x[index] = to_format(np.stack([images[i] for i in index]), ctx.image_shape)
            return ImageSet(x, None, folder.name)
        if ctx.split not in self.splits:
            raise PluginError(f"{self.name} has splits {self.splits}, not '{ctx.split}'")
        folder, files, classes, labels = self._select(ctx, ctx.split)
        if classes is None or labels is None:
            raise PluginError(f"{folder} is a flat folder of images without labels: as in-distribution data "
                              "give one subfolder per class")
        if self.paths["train"] and folder != self._folder(ctx, "train"):
            train_classes = scan(self._folder(ctx, "train"))[1] or []
            unknown = sorted(set(classes) - set(train_classes))
            if unknown:
                raise PluginError(f"{folder}: class folders {unknown} are not in the training folder "
                                  f"{self._folder(ctx, 'train')} (classes {train_classes})")
            labels = [train_classes.index(classes[i]) for i in labels]
            classes = train_classes
        reference = self._reference_shape(ctx, files)
        x = np.empty((len(files), *reference), np.uint8)
        for i, f in enumerate(files):
            image = read_image(f, self.mode)
            if image.shape != reference:
                raise PluginError(f"{f}: size {image.shape[2]}x{image.shape[1]} (W x H) differs from "
                                  f"{reference[2]}x{reference[1]}, the first training image's; in-distribution "
                                  "images must all have one size")
            x[i] = image
        return ImageSet(x, np.asarray(labels, np.int64), folder.name, len(classes))

    def _reference_shape(self, ctx: DatasetContext, files: list[Path]) -> tuple[int, int, int]:
        """C x H x W of the first training image (of the split's own first image without a train folder)."""
        first = scan(self._folder(ctx, "train"))[0][0] if self.paths["train"] else (files[0] if files else None)
        if first is None:
            raise PluginError(f"{self.name}: no images")
        return read_image(first, self.mode).shape  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------
# The ODIN paper's out-of-distribution sets
# ------------------------------------------------------------------------------------------
ODIN_README = "https://github.com/facebookresearch/odin"


class _OdinFolder(FolderImages):
    splits = ("test",)
    #: folder name as released with the ODIN code, and its download link (from the ODIN README)
    folder: ClassVar[str] = ""
    url: ClassVar[str] = ""

    def __init__(self, *, path: str = "", limit: int = 0):
        super().__init__(test=path or self.folder, limit=limit)

    def _missing(self, path: Path, split: str) -> MissingDataError:
        archive = self.url.rsplit("/", 1)[-1]
        return MissingDataError(
            f"{self.name}: folder not found: {path}. Download {self.url} (linked from the README of "
            f"{ODIN_README}, 'Downloading Out-of-Distribution Datasets') and extract it in --data-dir "
            f"(tar -xzf {archive}) so that {self.folder}/ holds its subfolder of images, or set the option 'path'.")

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.image_shape is None:
            raise PluginError(f"{self.name} is an out-of-distribution set: use it as a failure source (ood), "
                              "not as in-distribution data")
        return super().load(ctx)


class TinyImageNetCrop(_OdinFolder):
    """Tiny-ImageNet (crop), ODIN's OOD set: 10,000 random 32x32 crops of Tiny-ImageNet test images.

    The released ``Imagenet.tar.gz`` extracts to ``Imagenet/`` (one subfolder of images),
    read from ``--data-dir`` (option ``path`` to point elsewhere). Failure source only:
    images converted to the in-distribution format (``image-folder`` rules; 32x32 RGB for
    CIFAR needs no conversion); ``limit`` keeps N images picked by a fixed permutation.
    """

    name = "tiny-imagenet-crop"
    folder = "Imagenet"
    url = "https://www.dropbox.com/s/avgm2u562itwpkl/Imagenet.tar.gz"


class TinyImageNetResize(_OdinFolder):
    """Tiny-ImageNet (resize), ODIN's OOD set: 10,000 Tiny-ImageNet test images downsampled to 32x32.

    The released ``Imagenet_resize.tar.gz`` extracts to ``Imagenet_resize/`` (one subfolder of
    images), read from ``--data-dir``. Failure source only; conversion, ``path`` and ``limit``
    as ``tiny-imagenet-crop``.
    """

    name = "tiny-imagenet-resize"
    folder = "Imagenet_resize"
    url = "https://www.dropbox.com/s/kp3my3412u5k9rl/Imagenet_resize.tar.gz"


class LsunCrop(_OdinFolder):
    """LSUN (crop), ODIN's OOD set: 10,000 random 32x32 crops of LSUN test-set scene images.

    The released ``LSUN.tar.gz`` extracts to ``LSUN/`` (one subfolder of images), read from
    ``--data-dir``. Failure source only; conversion, ``path`` and ``limit`` as
    ``tiny-imagenet-crop``.
    """

    name = "lsun-crop"
    folder = "LSUN"
    url = "https://www.dropbox.com/s/fhtsw1m3qxlwj6h/LSUN.tar.gz"


class LsunResize(_OdinFolder):
    """LSUN (resize), ODIN's OOD set: 10,000 LSUN test-set scene images downsampled to 32x32.

    The released ``LSUN_resize.tar.gz`` extracts to ``LSUN_resize/`` (one subfolder of
    images), read from ``--data-dir``. Failure source only; conversion, ``path`` and
    ``limit`` as ``tiny-imagenet-crop``.
    """

    name = "lsun-resize"
    folder = "LSUN_resize"
    url = "https://www.dropbox.com/s/moqh2wh8696c3yl/LSUN_resize.tar.gz"


class ISun(_OdinFolder):
    """iSUN, ODIN's OOD set: 8,925 SUN scene images downsampled to 32x32.

    The released ``iSUN.tar.gz`` extracts to ``iSUN/`` (one subfolder of images), read from
    ``--data-dir``. Failure source only; conversion, ``path`` and ``limit`` as
    ``tiny-imagenet-crop``.
    """

    name = "isun"
    folder = "iSUN"
    url = "https://www.dropbox.com/s/ssz7qxfqae0cca5/iSUN.tar.gz"


# ------------------------------------------------------------------------------------------
# The OOD sets of ODIN's MNIST experiment (appendix A.1)
# ------------------------------------------------------------------------------------------
class _ReleasedFolder(_OdinFolder):
    """An image folder released elsewhere than with ODIN: its own how-to-get sentence."""

    how_to_get: ClassVar[str] = ""

    def _missing(self, path: Path, split: str) -> MissingDataError:
        return MissingDataError(f"{self.name}: folder not found: {path}. {self.how_to_get} Or set the option 'path'.")


class Omniglot(_ReleasedFolder):
    """Omniglot (Lake et al. 2015), ODIN's MNIST OOD set: 13,180 handwritten characters of 20 alphabets, 105x105.

    Read from ``omniglot-py/images_evaluation/`` under ``--data-dir`` (alphabet/character
    subfolders of PNGs), which is where ``torchvision.datasets.Omniglot(root, background=False,
    download=True)`` puts the evaluation alphabets. Failure source only: converted to the
    in-distribution format (``image-folder`` rules: grey, antialiased resize to 28x28 for
    MNIST). Omniglot draws dark strokes on white, MNIST light on black: no inversion is applied,
    as in ODIN's use. ``path`` and ``limit`` as ``tiny-imagenet-crop``.
    """

    name = "omniglot"
    folder = "omniglot-py/images_evaluation"
    how_to_get = ("Run torchvision.datasets.Omniglot(DATA_DIR, background=False, download=True) once, or extract "
                  "images_evaluation.zip of https://github.com/brendenlake/omniglot into DATA_DIR/omniglot-py/.")


class NotMNIST(_ReleasedFolder):
    """notMNIST (Bulatov 2011), ODIN's MNIST OOD set: typeface letters A-J, 28x28 grey.

    Read from ``notMNIST_small/`` under ``--data-dir``: the extracted ``notMNIST_small.tar.gz``
    of Yaroslav Bulatov's release (one folder per letter, ~18,700 PNGs; the release holds a
    couple of empty files, and the error names the first unreadable one: delete those). Failure source only;
    conversion, ``path`` and ``limit`` as ``tiny-imagenet-crop``.
    """

    name = "notmnist"
    folder = "notMNIST_small"
    how_to_get = ("Download notMNIST_small.tar.gz (http://yaroslavvb.com/upload/notMNIST/, linked from "
                  "http://yaroslavvb.blogspot.com/2011/09/notmnist-dataset.html) and extract it in DATA_DIR.")
