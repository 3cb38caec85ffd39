"""Common corruptions of the in-distribution test set (Hendrycks & Dietterich, ICLR 2019).

"Benchmarking Neural Network Robustness to Common Corruptions and Perturbations": the CIFAR-10-C
corruptions re-implemented with numpy, scipy and PIL (no OpenCV, scikit-image or ImageMagick), with
the severity constants of the authors' generator, ``ImageNet-C/create_c/make_cifar_c.py`` in
github.com/hendrycks/robustness. See :class:`CommonCorruption`.
"""
from __future__ import annotations

import io
from typing import Annotated, Callable, Literal, get_args

import numpy as np
from PIL import Image
from pydantic import Field

from oodbench.api import Dataset, DatasetContext, ImageSet, PluginError

Corruption = Literal["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "gaussian_blur",
                     "brightness", "fog", "contrast", "pixelate", "jpeg_compression"]
CORRUPTIONS: tuple[str, ...] = get_args(Corruption)

#: Severity 1..5 -> the constant of make_cifar_c.py (CIFAR-10-C, 32x32), per corruption.
SEVERITIES: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),          # std of the added noise
    "shot_noise": (500, 250, 100, 75, 50),                     # photons per unit intensity
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),           # fraction of values set to 0 or 1
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),  # (disk radius, alias sigma)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),                # sigma in pixels
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),                 # added to HSV value
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),  # (fog strength, plasma wibble decay)
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                   # factor on the deviation from the mean
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),                 # downscale factor
    "jpeg_compression": (80, 65, 58, 50, 40),                  # PIL JPEG quality
}
#: Corruptions that draw random numbers (the others are deterministic functions of the image).
RANDOM = frozenset({"gaussian_noise", "shot_noise", "impulse_noise", "fog"})


# -- float corruptions: N x C x H x W floats in [0, 1] in, unclipped floats out ---------------------
def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, c, x.shape)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # scikit-image's random_noise(mode="s&p", amount=c, salt_vs_pepper=0.5): every value (each channel
    # on its own) is replaced with probability c, by 1 (salt) or 0 (pepper) with equal odds.
    flipped = rng.random(x.shape) < c
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[flipped & salt] = 1.0
    out[flipped & ~salt] = 0.0
    return out


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """make_cifar_c.py's ``disk``: the pixels within ``radius`` of the centre (a 17 x 17 grid, normalised to
    sum 1) smoothed by a 3 x 3 Gaussian of sigma ``alias_blur`` (OpenCV's GaussianBlur: separable taps
    exp(-i^2 / (2 sigma^2)), i = -1, 0, 1, normalised); returned cropped to its non-zero support."""
    half = 8 if radius <= 8 else int(np.ceil(radius))
    grid = np.arange(-half, half + 1)
    xx, yy = np.meshgrid(grid, grid)
    aliased = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    aliased /= aliased.sum()
    taps = np.exp(-np.arange(-1, 2) ** 2 / (2.0 * alias_blur ** 2))
    taps /= taps.sum()
    from scipy import ndimage  # here, not at registration: scipy.ndimage costs every command ~0.5 s

    # The disk sits in the middle of a grid of zeros, so OpenCV's reflected border adds nothing: 'constant'.
    kernel = ndimage.convolve1d(ndimage.convolve1d(aliased, taps, axis=0, mode="constant"), taps, axis=1,
                                mode="constant")
    rows, cols = np.nonzero(kernel.any(axis=1))[0], np.nonzero(kernel.any(axis=0))[0]
    return kernel[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _defocus_blur(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    kernel = disk_kernel(*c)
    # cv2.filter2D: correlation (the kernel is symmetric anyway), borders reflected about the edge pixel
    # (BORDER_REFLECT_101 = scipy's 'mirror').
    from scipy import ndimage

    return ndimage.correlate(x, kernel[None, None], mode="mirror")


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    # skimage.filters.gaussian's defaults: borders by edge repetition ('nearest'), truncated at 4 sigma.
    from scipy import ndimage

    return ndimage.gaussian_filter(x, sigma=(0, 0, c, c), mode="nearest", truncate=4.0)


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    if x.shape[1] != 3:  # grey (or any non-RGB) image: every channel is its own value
        return x + c
    # RGB -> HSV, V += c (clipped to 1), HSV -> RGB. Hue and saturation fixed, the RGB values are linear in V
    # (V = max channel): so this is x * V'/V, and a black pixel (S = 0) becomes grey V'.
    value = x.max(axis=1, keepdims=True)
    shifted = np.clip(value + c, 0.0, 1.0)
    scale = np.divide(shifted, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * scale, shifted)


def plasma_fractal(rng: np.random.Generator, n: int, mapsize: int, wibbledecay: float) -> np.ndarray:
    """n diamond-square height maps of mapsize x mapsize (a power of two), each scaled to [0, 1]:
    make_cifar_c.py's ``plasma_fractal`` (its perturbation wibble * U(-wibble, wibble), wibble starting at
    100 and divided by ``wibbledecay`` each level, kept as written), drawn for a batch at once."""
    a = np.zeros((n, mapsize, mapsize))
    step, wibble = mapsize, 100.0

    def wibbled(total: np.ndarray) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    while step >= 2:
        half = step // 2
        corners = a[:, 0:mapsize:step, 0:mapsize:step]
        square = corners + np.roll(corners, -1, axis=1)
        square = square + np.roll(square, -1, axis=2)
        a[:, half:mapsize:step, half:mapsize:step] = wibbled(square)
        centres = a[:, half:mapsize:step, half:mapsize:step]
        corners = a[:, 0:mapsize:step, 0:mapsize:step]
        left = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=2)
        a[:, 0:mapsize:step, half:mapsize:step] = wibbled(left)
        top = centres + np.roll(centres, 1, axis=2) + corners + np.roll(corners, -1, axis=1)
        a[:, half:mapsize:step, 0:mapsize:step] = wibbled(top)
        step //= 2
        wibble /= wibbledecay
    a -= a.min(axis=(1, 2), keepdims=True)
    return a / a.max(axis=(1, 2), keepdims=True)


def _fog(x: np.ndarray, c: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    n, _, h, w = x.shape
    mapsize = max(2, 1 << int(np.ceil(np.log2(max(h, w)))))
    fractal = plasma_fractal(rng, n, mapsize, c[1])[:, None, :h, :w]
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    return (x + c[0] * fractal) * peak / (peak + c[0])


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(2, 3), keepdims=True)
    return (x - means) * c + means


# -- uint8 corruptions through PIL: N x C x H x W uint8 in and out ----------------------------------
def _pil_images(x: np.ndarray) -> list[tuple[int, Image.Image]]:
    """(index, PIL image) for each image: RGB as one image (as make_cifar_c.py's), other channels one by one."""
    if x.shape[1] == 3:
        return [(i, Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB")) for i, img in enumerate(x)]
    return [((i, ch), Image.fromarray(np.ascontiguousarray(img[ch]), "L"))
            for i, img in enumerate(x) for ch in range(x.shape[1])]


def _through_pil(x: np.ndarray, change: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    out = np.empty_like(x)
    for where, image in _pil_images(x):
        result = np.asarray(change(image))
        out[where] = result.transpose(2, 0, 1) if result.ndim == 3 else result
    return out


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    h, w = x.shape[2:]
    small = (max(1, int(w * c)), max(1, int(h * c)))
    return _through_pil(x, lambda im: im.resize(small, Image.BOX).resize((w, h), Image.BOX))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    decoded = Image.open(buffer)
    decoded.load()
    return decoded


def _jpeg_compression(x: np.ndarray, c: int, rng: np.random.Generator) -> np.ndarray:
    return _through_pil(x, lambda im: _jpeg(im, c))


_FLOAT = {"gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "impulse_noise": _impulse_noise,
          "defocus_blur": _defocus_blur, "gaussian_blur": _gaussian_blur, "brightness": _brightness,
          "fog": _fog, "contrast": _contrast}
_UINT8 = {"pixelate": _pixelate, "jpeg_compression": _jpeg_compression}


def corrupt(x: np.ndarray, corruption: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` (uint8 N x C x H x W) under ``corruption`` at ``severity`` (1..5): uint8 of the same shape."""
    if corruption not in SEVERITIES:
        raise PluginError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise PluginError(f"corruption severity must be 1..5, got {severity}")
    if x.dtype != np.uint8 or x.ndim != 4:
        raise PluginError(f"corruptions take uint8 N x C x H x W images, got {x.dtype} {x.shape}")
    c = SEVERITIES[corruption][severity - 1]
    if corruption in _UINT8:
        return _UINT8[corruption](np.asarray(x), c, rng)
    out = _FLOAT[corruption](x.astype(np.float64) / 255.0, c, rng)
    return np.rint(np.clip(out, 0.0, 1.0) * 255.0).astype(np.uint8)


class CommonCorruption(Dataset):
    """The in-distribution test images under one of Hendrycks & Dietterich's common corruptions, at a severity 1-5.

    Paper: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
    Perturbations" (ICLR 2019). Formulas and severity constants (tuple index = severity - 1) are those of the
    authors' CIFAR-10-C generator, ``ImageNet-C/create_c/make_cifar_c.py`` in github.com/hendrycks/robustness,
    re-implemented with numpy, scipy and PIL. Labels and ``num_classes`` are kept: the images are the same
    objects, shifted (covariate shift), so a source can ask which of them the classifier still gets right.

    Except pixelate and JPEG (which, as in the authors' code, go through PIL on the uint8 image), x is the image
    as floats in [0, 1] (value / 255), and the result is clipped to [0, 1] and rounded back to uint8 (the
    authors truncate with ``np.uint8``, half a grey level darker on average). Random draws come from
    ``np.random.default_rng([seed, ctx.seed])``, one stream for the whole set, independent per value:

    * ``gaussian_noise``: x + N(0, c^2), c = (0.04, 0.06, 0.08, 0.09, 0.10).
    * ``shot_noise``: Poisson(x c) / c, c = (500, 250, 100, 75, 50).
    * ``impulse_noise`` (salt and pepper, scikit-image's ``random_noise(mode="s&p", amount=c)``): each value
      (each channel on its own) becomes 1 or 0, equally likely, with probability c = (.01, .02, .03, .05, .07).
    * ``defocus_blur``: correlation with a disk kernel (reflect-101 borders, as cv2.filter2D): the pixels
      within radius r of the centre, normalised, smoothed by a 3 x 3 Gaussian of sigma a;
      (r, a) = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)).
    * ``gaussian_blur``: Gaussian filter of sigma c = (0.4, 0.6, 0.7, 0.8, 1) per channel, truncated at 4 sigma,
      borders by edge repetition (scikit-image's ``gaussian`` defaults).
    * ``brightness``: RGB -> HSV, V = clip(V + c, 0, 1), HSV -> RGB, c = (.05, .1, .15, .2, .3); on a grey image
      (any channel count but 3) each channel is its own value: clip(x + c, 0, 1).
    * ``fog``: (x + s P) max(x) / (max(x) + s), P a diamond-square plasma fractal in [0, 1] (one per image,
      the same for every channel) with wibble decay d; (s, d) = ((.2, 3), (.5, 3), (.75, 2.5), (1, 2), (1.5, 1.75)).
    * ``contrast``: (x - m) c + m, m the image's mean per channel, c = (.75, .5, .4, .3, .15).
    * ``pixelate``: PIL box resize to int(side c) and back, c = (.95, .9, .85, .75, .65).
    * ``jpeg_compression``: PIL JPEG round trip at quality c = (80, 65, 58, 50, 40).

    RGB images go through PIL as RGB; any other channel count channel by channel (mode "L"); the float
    corruptions work per channel except brightness (HSV, for RGB) and fog (one fractal for all channels).

    Other sizes: the constants are CIFAR-10-C's (32 x 32) at every image size, e.g. the 8 x 8 grey digits,
    where a severity is therefore stronger relative to the image. Kernels are not rescaled: the defocus kernel
    (at most 5 x 5 once its zero border is cropped) and the Gaussian (9 taps at sigma 1) reach past the border
    of small images through the border rule above; pixelate's int(side c) is at least 1 (8 x 8 digits go
    through 7, 7, 6, 6, 5 pixels); fog draws its fractal on the next power of two >= the larger side and crops
    it (32 for CIFAR, as the authors do; 8 for the digits). Images are uint8 like the input (float32 input is
    rounded to uint8 first); this changes no score beyond that rounding.

    ``seed`` is the run's (the core passes it, as to every plugin; it is no user option).

    Options:
        corruption: which corruption, by the name of make_cifar_c.py's function
        severity: 1 (mildest) to 5
    """

    name = "corrupted"

    def __init__(self, *, corruption: Corruption = "gaussian_noise",
                 severity: Annotated[int, Field(ge=1, le=5)] = 3, seed: int = 0):
        if corruption not in SEVERITIES:
            raise PluginError(f"unknown corruption {corruption!r}; choose one of {', '.join(CORRUPTIONS)}")
        if not 1 <= severity <= 5:
            raise PluginError(f"corruption severity must be 1..5, got {severity}")
        self.corruption = corruption
        self.severity = severity
        self.seed = seed

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.in_distribution is None:
            raise PluginError("corrupted needs the in-distribution test set")
        test = ctx.in_distribution("test")
        x = test.x
        if x.dtype != np.uint8:
            x = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
        rng = np.random.default_rng([self.seed, ctx.seed])
        out = corrupt(x, self.corruption, self.severity, rng)
        return ImageSet(out, test.y, f"{self.corruption}-{self.severity}", test.num_classes)
