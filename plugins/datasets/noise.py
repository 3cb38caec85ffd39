"""Synthetic noise images as defined in ODIN (Liang et al. 2018, section 4.2)."""
from __future__ import annotations

import numpy as np

from oodbench.api import Dataset, DatasetContext, ImageSet, PluginError


class _Noise(Dataset):
    def __init__(self, *, size: int = 0, seed: int = 0):
        self.size = size
        self.seed = seed

    def _shape(self, ctx: DatasetContext) -> tuple[int, ...]:
        if ctx.image_shape is None:
            raise PluginError(f"{self.name} is a failure source: it needs the in-distribution image shape")
        return (self.size or ctx.size or 10000, *ctx.image_shape)

    def _rng(self, ctx: DatasetContext) -> np.random.Generator:
        return np.random.default_rng([self.seed, ctx.seed, len(self.name)])


class GaussianNoise(_Noise):
    """Gaussian noise (ODIN): every pixel value i.i.d. N(0.5, 1), clipped to [0, 1].

    float32 images (not quantised to 256 levels), ``size`` of them (default: as many as the
    in-distribution test set), in the in-distribution shape; seeded by the run's seed.
    """

    name = "gaussian"

    def load(self, ctx: DatasetContext) -> ImageSet:
        x = self._rng(ctx).normal(0.5, 1.0, self._shape(ctx)).clip(0.0, 1.0).astype(np.float32)
        return ImageSet(x, None, self.name)


class UniformNoise(_Noise):
    """Uniform noise (ODIN): every pixel value i.i.d. U[0, 1]; float32, seeded, ID shape."""

    name = "uniform"

    def load(self, ctx: DatasetContext) -> ImageSet:
        x = self._rng(ctx).uniform(0.0, 1.0, self._shape(ctx)).astype(np.float32)
        return ImageSet(x, None, self.name)
