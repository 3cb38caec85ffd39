"""The offline default benchmark's data: scikit-learn's bundled 8x8 digits, and natural patches."""
from __future__ import annotations

from pathlib import Path

import importlib.util

import numpy as np

from oodbench.api import Dataset, DatasetContext, ImageSet, PluginError, files_sha256

from .convert import to_format

# scikit-learn is imported where its loaders run (in a task), not at registration: importing it pulls in
# scipy.stats and costs every command ~2 s, while the driver needs only the folder its bundled files are in
# (for the fingerprints), which find_spec gives without running the package.
_SKLEARN_DATA = Path(importlib.util.find_spec("sklearn").submodule_search_locations[0]) / "datasets"


class Digits(Dataset):
    """scikit-learn's 1,797 handwritten 8x8 digits (UCI), fixed stratified 60/20/20 split; offline.

    Pixels 0..16 are scaled to uint8 0..255 (x * 255 / 16, rounded). The split is part of
    the benchmark definition (stratified, ``split_seed`` 0), not of the run's seed, so every
    seed evaluates the same test images. ``classes`` keeps only some digits (for a
    held-out-classes benchmark: train on ``classes``, evaluate the others as OOD with
    ``complement = true``).
    """

    name = "digits"
    splits = ("train", "val", "test")

    def __init__(self, *, split_seed: int = 0, classes: tuple[int, ...] | list[int] = tuple(range(10)), complement: bool = False):
        self.split_seed = split_seed
        self.classes = tuple(int(c) for c in classes)
        self.complement = complement

    def fingerprint(self, data_dir: Path) -> str:
        """The sha256 of scikit-learn's bundled ``digits.csv.gz``, which ``load_digits`` reads."""
        return files_sha256([_SKLEARN_DATA / "data" / "digits.csv.gz"])

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.split not in self.splits:
            raise PluginError(f"digits has splits {self.splits}, not '{ctx.split}'")
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
        y = data.target.astype(np.int64)
        idx = np.arange(len(y))
        train, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=self.split_seed)
        val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=self.split_seed)
        chosen = {"train": train, "val": val, "test": test}[ctx.split]
        keep = np.isin(y[chosen], self.classes) != self.complement
        chosen = np.sort(chosen[keep])
        # Labels are re-indexed to 0..len(classes)-1 so a classifier on a subset has no dead outputs.
        remap = {c: i for i, c in enumerate(self.classes)}
        labels = np.array([remap.get(int(c), -1) for c in y[chosen]], dtype=np.int64)
        name = "digits" if not self.complement else "digits-heldout"
        return ImageSet(x[chosen], None if self.complement else labels, name, len(self.classes))


class NaturalPatches(Dataset):
    """Random patches of scikit-learn's two bundled photographs, converted to the ID format; offline.

    Each image is a random square crop (side uniform in [32, 128] pixels) of ``china.jpg`` or
    ``flower.jpg``, then converted (grey by luma if the ID data has one channel, antialiased
    resize to the ID size). ``size`` images (default: as many as the ID test set), seeded.
    """

    name = "natural-patches"

    def __init__(self, *, size: int = 0, seed: int = 0):
        self.size = size
        self.seed = seed

    def fingerprint(self, data_dir: Path) -> str:
        """The sha256 of scikit-learn's two bundled photographs, which ``load_sample_images`` reads."""
        return files_sha256(sorted((_SKLEARN_DATA / "images").glob("*.jpg")))

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.image_shape is None:
            raise PluginError("natural-patches is a failure source: it needs the in-distribution image shape")
        n = self.size or ctx.size or 1000
        rng = np.random.default_rng([self.seed, ctx.seed])
        from sklearn.datasets import load_sample_images

        photos = [np.asarray(img) for img in load_sample_images().images]
        out = np.empty((n, *ctx.image_shape), np.uint8)
        for i in range(n):
            photo = photos[rng.integers(len(photos))]
            side = int(rng.integers(32, 129))
            top = int(rng.integers(0, photo.shape[0] - side + 1))
            left = int(rng.integers(0, photo.shape[1] - side + 1))
            crop = photo[top:top + side, left:left + side].transpose(2, 0, 1)[None]
            out[i] = to_format(crop, ctx.image_shape)[0]
        return ImageSet(out, None, "natural-patches")
