"""Failure sources derived from the in-distribution test set."""
from __future__ import annotations

import numpy as np

from oodbench.api import Dataset, DatasetContext, ImageSet, PluginError


class Flip(Dataset):
    """The in-distribution test images flipped horizontally or vertically (WAIC paper's HFlip/VFlip).

    Symmetric images (a '0', an '8') stay in-distribution after a flip, so some negatives
    are genuinely indistinguishable: that is part of the source's difficulty.
    """

    name = "flip"

    def __init__(self, *, axis: str = "horizontal"):
        if axis not in ("horizontal", "vertical"):
            raise PluginError(f"flip axis must be 'horizontal' or 'vertical', not '{axis}'")
        self.axis = axis

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.in_distribution is None:
            raise PluginError("flip needs the in-distribution test set")
        test = ctx.in_distribution("test")
        x = test.x[..., ::-1] if self.axis == "horizontal" else test.x[..., ::-1, :]
        return ImageSet(np.ascontiguousarray(x), None, f"{self.axis[0]}flip")
