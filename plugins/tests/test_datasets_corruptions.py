"""The `corrupted` dataset: Hendrycks & Dietterich's common corruptions of the in-distribution test set.

Each corruption has a known-answer test whose expected value is computed here independently (closed forms,
explicit kernels and loops, PIL directly, noise statistics), plus severity monotonicity, seeding, the
options' validation and one run of the digits benchmark with a corrupted source.
"""
import dataclasses
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oodbench.api import DatasetContext, ImageSet
from oodbench.benchmark import OODRef, load_benchmark
from oodbench.cli import parse_detectors
from oodbench.leaderboard import results_frame
from oodbench.plugins import OptionError, resolve_options
from oodbench.runner import RunOptions, run_benchmark
from oodbench_plugins.datasets.corruptions import (CORRUPTIONS, RANDOM, CommonCorruption, corrupt, disk_kernel,
                                                   plasma_fractal)

# make_cifar_c.py's constants, written out again (not imported) so a changed table fails here.
HENDRYCKS = {
    "gaussian_noise": [0.04, 0.06, .08, .09, .10],
    "shot_noise": [500, 250, 100, 75, 50],
    "impulse_noise": [.01, .02, .03, .05, .07],
    "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
    "gaussian_blur": [.4, .6, 0.7, .8, 1],
    "brightness": [.05, .1, .15, .2, .3],
    "fog": [(.2, 3), (.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
    "contrast": [.75, .5, .4, .3, 0.15],
    "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
    "jpeg_compression": [80, 65, 58, 50, 40],
}
SEVERITIES = range(1, 6)


def _images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _to_uint8(f):
    return np.rint(np.clip(f, 0, 1) * 255).astype(np.uint8)


def _rounds(out, expected):
    """``out`` is ``expected`` (floats in [0, 1] before clipping) rounded to uint8, up to float error at a .5 tie."""
    assert out.dtype == np.uint8 and out.shape == expected.shape
    assert np.abs(out - np.clip(expected, 0, 1) * 255).max() <= 0.5 + 1e-6


def _run(x, corruption, severity, seed=1):
    return corrupt(x, corruption, severity, np.random.default_rng(seed))


def test_every_corruption_of_the_issue_is_there_with_hendrycks_constants():
    from oodbench_plugins.datasets.corruptions import SEVERITIES as table
    assert set(CORRUPTIONS) == set(HENDRYCKS)
    for name, constants in HENDRYCKS.items():
        assert [tuple(c) if isinstance(c, tuple) else c for c in constants] == list(table[name]), name


# -- known answers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_is_the_deviation_from_the_channel_mean_scaled(severity):
    x = _images((2, 3, 4, 4))
    c = HENDRYCKS["contrast"][severity - 1]
    f = x / 255.0
    mean = f.mean(axis=(2, 3), keepdims=True)
    np.testing.assert_array_equal(_run(x, "contrast", severity), _to_uint8((f - mean) * c + mean))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_on_grey_adds_c_to_the_value(severity):
    x = _images((2, 1, 5, 5))
    c = HENDRYCKS["brightness"][severity - 1]
    np.testing.assert_array_equal(_run(x, "brightness", severity), _to_uint8(x / 255.0 + c))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_on_rgb_shifts_the_hsv_value(severity):
    colors = pytest.importorskip("matplotlib.colors")
    x = _images((2, 3, 6, 6))
    x[0, :, 0, 0] = 0  # a black pixel: no hue, becomes grey
    c = HENDRYCKS["brightness"][severity - 1]
    hsv = colors.rgb_to_hsv(x.transpose(0, 2, 3, 1) / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    expected = colors.hsv_to_rgb(hsv).transpose(0, 3, 1, 2)
    out = _run(x, "brightness", severity)
    _rounds(out, expected)
    assert (out[0, :, 0, 0] == round(c * 255)).all()


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_is_the_image_plus_normal_noise_of_std_c(severity):
    c = HENDRYCKS["gaussian_noise"][severity - 1]
    x = np.full((1, 1, 300, 300), 128, np.uint8)
    out = _run(x, "gaussian_noise", severity, seed=7)
    expected = _to_uint8(x / 255.0 + np.random.default_rng(7).normal(0.0, c, x.shape))
    np.testing.assert_array_equal(out, expected)
    noise = (out.astype(float) - x) / 255.0  # no clipping at 0.5 +- 5 std
    assert abs(noise.mean()) < 3 * c / 300
    assert noise.std() == pytest.approx(math.hypot(c, 1 / 255 / math.sqrt(12)), rel=0.02)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shot_noise_is_poisson_counts_of_c_photons(severity):
    c = HENDRYCKS["shot_noise"][severity - 1]
    x = np.full((1, 1, 300, 300), 128, np.uint8)
    out = _run(x, "shot_noise", severity, seed=7)
    np.testing.assert_array_equal(out, _to_uint8(np.random.default_rng(7).poisson(x / 255.0 * c) / c))
    f = out / 255.0
    assert abs(f.mean() - 128 / 255) < 4 * math.sqrt(128 / 255 / c) / 300
    assert f.var() == pytest.approx(128 / 255 / c + (1 / 255) ** 2 / 12, rel=0.05)  # Poisson: var = mean / c


@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_sets_a_fraction_c_of_values_to_black_or_white(severity):
    c = HENDRYCKS["impulse_noise"][severity - 1]
    x = np.full((1, 3, 200, 200), 100, np.uint8)
    out = _run(x, "impulse_noise", severity)
    assert set(np.unique(out)) <= {0, 100, 255}
    n = out.size
    flipped = (out != 100).mean()
    assert abs(flipped - c) < 4 * math.sqrt(c * (1 - c) / n)
    assert abs((out == 255).sum() / (out != 100).sum() - 0.5) < 4 * 0.5 / math.sqrt(c * n)
    # each channel on its own (scikit-image's random_noise works on the whole array)
    assert ((out != 100).sum(axis=1) == 1).any()


def _explicit_disk(radius, alias_blur):
    """make_cifar_c.py's disk written out: a 17 x 17 grid, then OpenCV's 3 x 3 GaussianBlur by hand."""
    disk = np.array([[1.0 if i * i + j * j <= radius ** 2 else 0.0 for j in range(-8, 9)] for i in range(-8, 9)])
    disk /= disk.sum()
    g = np.array([math.exp(-1 / (2 * alias_blur ** 2)), 1.0, math.exp(-1 / (2 * alias_blur ** 2))])
    g /= g.sum()
    kernel = np.zeros_like(disk)
    for i in range(17):
        for j in range(17):
            for di in (-1, 0, 1):
                for dj in (-1, 0, 1):
                    if 0 <= i + di < 17 and 0 <= j + dj < 17:
                        kernel[i, j] += g[di + 1] * g[dj + 1] * disk[i + di, j + dj]
    return kernel


def test_the_disk_kernel_is_make_cifar_c_s_cropped_to_its_support():
    for radius, blur in HENDRYCKS["defocus_blur"]:
        full = _explicit_disk(radius, blur)
        cropped = disk_kernel(radius, blur)
        k = cropped.shape[0]
        assert cropped.shape == (k, k) and k in (3, 5)
        np.testing.assert_allclose(cropped, full[8 - k // 2:9 + k // 2, 8 - k // 2:9 + k // 2], atol=1e-15)
        assert full.sum() == pytest.approx(cropped.sum()) == pytest.approx(1.0)
    # severities 1-3: the disk is the centre pixel alone, so the kernel is the Gaussian's outer product
    g = np.array([math.exp(-1 / (2 * 0.4 ** 2)), 1, math.exp(-1 / (2 * 0.4 ** 2))])
    np.testing.assert_allclose(disk_kernel(0.3, 0.4), np.outer(g, g) / g.sum() ** 2)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_defocus_blur_is_the_disk_kernel_with_reflected_borders(severity):
    x = _images((2, 3, 10, 10))
    kernel = _explicit_disk(*HENDRYCKS["defocus_blur"][severity - 1])
    padded = np.pad(x / 255.0, ((0, 0), (0, 0), (8, 8), (8, 8)), mode="reflect")  # numpy's reflect = cv2's 101
    expected = np.zeros(x.shape)
    for u in range(17):
        for v in range(17):
            expected += kernel[u, v] * padded[:, :, u:u + 10, v:v + 10]
    _rounds(_run(x, "defocus_blur", severity), expected)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_blur_is_a_separable_gaussian_with_repeated_edges(severity):
    sigma = HENDRYCKS["gaussian_blur"][severity - 1]
    x = _images((2, 1, 8, 8))
    radius = int(4 * sigma + 0.5)
    taps = np.array([math.exp(-t * t / (2 * sigma ** 2)) for t in range(-radius, radius + 1)])
    taps /= taps.sum()
    padded = np.pad(x / 255.0, ((0, 0), (0, 0), (radius, radius), (radius, radius)), mode="edge")
    rows = sum(taps[i] * padded[:, :, i:i + 8, :] for i in range(2 * radius + 1))
    expected = sum(taps[j] * rows[:, :, :, j:j + 8] for j in range(2 * radius + 1))
    _rounds(_run(x, "gaussian_blur", severity), expected)


def _pil_rgb(img):
    return Image.fromarray(img.transpose(1, 2, 0), "RGB")


@pytest.mark.parametrize("severity", SEVERITIES)
def test_pixelate_is_pil_box_down_and_up(severity):
    c = HENDRYCKS["pixelate"][severity - 1]
    rgb = _images((2, 3, 32, 32))
    out = _run(rgb, "pixelate", severity)
    for img, got in zip(rgb, out):
        small = _pil_rgb(img).resize((int(32 * c), int(32 * c)), Image.BOX)
        np.testing.assert_array_equal(got, np.asarray(small.resize((32, 32), Image.BOX)).transpose(2, 0, 1))
    grey = _images((2, 1, 8, 8))
    out = _run(grey, "pixelate", severity)
    for img, got in zip(grey, out):
        small = Image.fromarray(img[0], "L").resize((int(8 * c), int(8 * c)), Image.BOX)
        np.testing.assert_array_equal(got[0], np.asarray(small.resize((8, 8), Image.BOX)))


def _jpeg(image, quality):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


@pytest.mark.parametrize("severity", SEVERITIES)
def test_jpeg_compression_is_a_pil_round_trip_at_hendrycks_quality(severity):
    quality = HENDRYCKS["jpeg_compression"][severity - 1]
    rgb = _images((2, 3, 16, 16))
    out = _run(rgb, "jpeg_compression", severity)
    for img, got in zip(rgb, out):
        np.testing.assert_array_equal(got, _jpeg(_pil_rgb(img), quality).transpose(2, 0, 1))
    grey = _images((2, 2, 8, 8))  # not RGB: channel by channel, as grey images
    out = _run(grey, "jpeg_compression", severity)
    for img, got in zip(grey, out):
        for ch in range(2):
            np.testing.assert_array_equal(got[ch], _jpeg(Image.fromarray(img[ch], "L"), quality))


def _sequential_plasma(rng, mapsize, decay):
    """make_cifar_c.py's plasma_fractal for one map, in its own order of operations."""
    m = np.zeros((mapsize, mapsize))
    step, wibble = mapsize, 100.0
    while step >= 2:
        h = step // 2
        ul = m[0::step, 0::step].copy()
        acc = ul + np.roll(ul, -1, axis=0)
        acc = acc + np.roll(acc, -1, axis=1)
        m[h::step, h::step] = acc / 4 + wibble * rng.uniform(-wibble, wibble, acc.shape)
        dr = m[h::step, h::step].copy()
        lt = dr + np.roll(dr, 1, axis=0) + ul + np.roll(ul, -1, axis=1)
        m[0::step, h::step] = lt / 4 + wibble * rng.uniform(-wibble, wibble, lt.shape)
        tt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=0)
        m[h::step, 0::step] = tt / 4 + wibble * rng.uniform(-wibble, wibble, tt.shape)
        step //= 2
        wibble /= decay
    m -= m.min()
    return m / m.max()


@pytest.mark.parametrize("mapsize, decay", [(8, 3), (32, 1.75)])
def test_the_plasma_fractal_is_the_diamond_square_of_make_cifar_c(mapsize, decay):
    got = plasma_fractal(np.random.default_rng(3), 1, mapsize, decay)[0]
    np.testing.assert_allclose(got, _sequential_plasma(np.random.default_rng(3), mapsize, decay), atol=1e-12)
    assert got.min() == 0 and got.max() == 1


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("shape, mapsize", [((1, 3, 32, 32), 32), ((1, 1, 8, 8), 8), ((1, 3, 20, 12), 32)])
def test_fog_adds_a_plasma_fractal_scaled_to_keep_the_maximum(severity, shape, mapsize):
    strength, decay = HENDRYCKS["fog"][severity - 1]
    x = _images(shape)
    out = _run(x, "fog", severity, seed=5)
    h, w = shape[2:]
    fractal = _sequential_plasma(np.random.default_rng(5), mapsize, decay)[:h, :w]  # cropped, as the authors'
    f = x / 255.0
    peak = f.max()
    _rounds(out, (f + strength * fractal) * peak / (peak + strength))


# -- properties -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_the_change_grows_with_severity(corruption):
    x = _images((4, 3, 32, 32))
    change = [np.abs(_run(x, corruption, s).astype(float) - x).mean() for s in SEVERITIES]
    assert all(a < b for a, b in zip(change, change[1:])), change
    grey = _images((4, 1, 8, 8))  # at 8 x 8 pixelate's int(8 c) repeats (7, 7, 6, 6, 5): never decreasing
    change = [np.abs(_run(grey, corruption, s).astype(float) - grey).mean() for s in SEVERITIES]
    assert all(a <= b for a, b in zip(change, change[1:])), change


class _Ctx:
    def __init__(self, test, seed=0):
        self.test, self.seed = test, seed

    def __call__(self, seed=0):
        return DatasetContext(split="test", seed=seed, data_dir=Path("."), image_shape=self.test.image_shape,
                              size=len(self.test), in_distribution=lambda split: self.test)


@pytest.fixture
def id_test():
    return ImageSet(_images((6, 1, 8, 8)), np.arange(6) % 3, "id", 3)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_labels_shape_and_dtype_are_kept_and_seeds_decide_the_random_ones(corruption, id_test):
    ctx = _Ctx(id_test)
    out = CommonCorruption(corruption=corruption, severity=4).load(ctx(seed=0))
    assert out.x.shape == id_test.x.shape and out.x.dtype == np.uint8
    np.testing.assert_array_equal(out.y, id_test.y)
    assert out.num_classes == 3 and out.name == f"{corruption}-4"
    again = CommonCorruption(corruption=corruption, severity=4).load(ctx(seed=0))
    assert again.x.tobytes() == out.x.tobytes()
    other_run = CommonCorruption(corruption=corruption, severity=4).load(ctx(seed=1))
    other_seed = CommonCorruption(corruption=corruption, severity=4, seed=1).load(ctx(seed=0))
    for other in (other_run, other_seed):
        assert (other.x.tobytes() != out.x.tobytes()) == (corruption in RANDOM)


def test_float_input_is_rounded_to_uint8_first():
    x = _images((2, 3, 8, 8))
    as_float = ImageSet((x / 255.0).astype(np.float32), np.zeros(2, np.int64), "f", 1)
    out = CommonCorruption(corruption="contrast", severity=2).load(_Ctx(as_float)())
    np.testing.assert_array_equal(out.x, _run(x, "contrast", 2))


@pytest.mark.parametrize("options, words", [
    ({"severity": 0}, "option severity=0: expected an integer >= 1 and <= 5"),
    ({"severity": 6}, "option severity=6: expected an integer >= 1 and <= 5"),
    ({"severity": 2.5}, "option severity=2.5: expected an integer"),
    ({"corruption": "snow"}, "option corruption='snow': expected one of 'gaussian_noise'"),
])
def test_bad_options_are_refused_before_any_work(registry, options, words):
    with pytest.raises(OptionError, match="dataset 'corrupted'") as error:
        resolve_options(registry.get("datasets", "corrupted"), options)
    assert words in str(error.value)


def test_good_options_resolve(registry):
    resolved = resolve_options(registry.get("datasets", "corrupted"), {"corruption": "fog", "severity": 5}, seed=2)
    assert resolved == {"corruption": "fog", "severity": 5, "seed": 2}


def test_a_digits_run_with_a_corrupted_source(registry, tmp_path):
    bench = load_benchmark(registry.get("benchmarks", "digits").target)
    source = OODRef(name="gaussian_noise-5", dataset="corrupted",
                    options={"corruption": "gaussian_noise", "severity": 5})
    bench = dataclasses.replace(bench, ood=(source,), attacks=())
    options = RunOptions(benchmark=bench, detectors=parse_detectors("msp"), seeds=[0], cache_dir=tmp_path,
                         data_dir=Path("."), device=torch.device("cpu"), progress=False, executor="inline")
    frame = results_frame(run_benchmark(options, registry).rows)
    row = frame.set_index("source").loc["ood:gaussian_noise-5"]
    assert row["status"] == "ok", row["error"]
    assert 0 <= row["auroc"] <= 1 and row["n_neg"] > 0
