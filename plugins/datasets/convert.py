"""Converting foreign images to the in-distribution format (channels, size)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def to_format(x: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
    """NCHW uint8 images -> ``image_shape`` (C, H, W), uint8.

    Channels: RGB -> 1 channel by ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B);
    1 channel -> 3 by repetition. Size: antialiased bilinear resize of the whole image.
    """
    c, h, w = image_shape
    t = torch.tensor(x, dtype=torch.float32)  # a copy: x may be a read-only ImageSet array
    if t.shape[1] == 3 and c == 1:
        t = (t * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif t.shape[1] == 1 and c == 3:
        t = t.expand(-1, 3, -1, -1)
    elif t.shape[1] != c:
        raise ValueError(f"cannot convert {t.shape[1]}-channel images to {c} channels")
    if t.shape[2:] != (h, w):
        t = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()
