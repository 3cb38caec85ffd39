"""The image-folder dataset and the ODIN paper's OOD folders, on small PNG/JPEG files written with PIL."""
import json
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from PIL import Image

from oodbench.api import DatasetContext, MissingDataError, PluginError
from oodbench.cli import main
from oodbench.plugins import UnknownPluginError, instantiate
from oodbench_plugins.datasets.convert import to_format

ODIN = {"tiny-imagenet-crop": "Imagenet", "tiny-imagenet-resize": "Imagenet_resize", "lsun-crop": "LSUN",
        "lsun-resize": "LSUN_resize", "isun": "iSUN"}


def make(registry, name, **options):
    return instantiate(registry.get("datasets", name), options, seed=0)


def ctx(data_dir, split="test", **kw):
    return DatasetContext(split=split, seed=0, data_dir=Path(data_dir), **kw)


def save(path: Path, array: np.ndarray) -> np.ndarray:
    """Write an H x W x C (or H x W) uint8 array as an image; return it as C x H x W."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def class_tree(root: Path, counts: dict[str, int], size=(5, 4), seed=0) -> dict[str, np.ndarray]:
    """``counts[c]`` random RGB PNGs per class folder (H x W = size); returns relative path -> C x H x W pixels."""
    rng = np.random.default_rng(seed)
    written = {}
    for cls, n in counts.items():
        for i in range(n):
            rel = f"{cls}/img{i:02d}.png" if i % 3 else f"{cls}/nested/img{i:02d}.png"  # ImageFolder walks subfolders
            written[rel] = save(root / rel, rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    return written


# ---- class layout ----------------------------------------------------------------------------
def test_labels_are_sorted_subfolder_names_in_imagefolder_order_with_exact_pixels(registry, tmp_path):
    written = class_tree(tmp_path / "train", {"dog": 4, "ant": 3, "cat": 5})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    save(tmp_path / "train" / "ant" / ".hidden.png", np.zeros((5, 4, 3), np.uint8))  # skipped
    data = make(registry, "image-folder", train="train").load(ctx(tmp_path, "train"))
    assert data.x.shape == (12, 3, 5, 4) and data.x.dtype == np.uint8 and data.y.dtype == np.int64
    assert data.num_classes == 3 and data.name == "train"
    reference = tvd.ImageFolder(str(tmp_path / "train"))  # torchvision's order and labels, minus the hidden file
    samples = [(p, y) for p, y in reference.samples if not Path(p).name.startswith(".")]
    assert reference.classes == ["ant", "cat", "dog"]
    assert data.y.tolist() == [y for _, y in samples] == [0] * 3 + [1] * 5 + [2] * 4
    for i, (path, _) in enumerate(samples):
        assert np.array_equal(data.x[i], written[str(Path(path).relative_to(tmp_path / "train"))])


def test_test_folder_labels_follow_the_training_classes(registry, tmp_path):
    class_tree(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    test = class_tree(tmp_path / "test", {"c": 2, "a": 1}, seed=1)  # no 'b': sorted names alone would give c -> 1
    data = make(registry, "image-folder", train="train", test="test").load(ctx(tmp_path))
    assert data.y.tolist() == [0, 2, 2] and data.num_classes == 3
    # within a class, ImageFolder's walk order: c/img01.png before c/nested/img00.png
    assert np.array_equal(data.x[1], test["c/img01.png"]) and np.array_equal(data.x[2], test["c/nested/img00.png"])
    class_tree(tmp_path / "odd", {"a": 1, "z": 1})
    with pytest.raises(PluginError, match=r"class folders \['z'\] are not in the training folder"):
        make(registry, "image-folder", train="train", test="odd").load(ctx(tmp_path))


def test_val_from_train_is_a_fixed_disjoint_holdout_spanning_classes(registry, tmp_path):
    class_tree(tmp_path / "train", {"a": 6, "b": 6, "c": 6})
    folder = make(registry, "image-folder", train="train", val_from_train=5)
    full = make(registry, "image-folder", train="train").load(ctx(tmp_path, "train"))
    train, val = folder.load(ctx(tmp_path, "train")), folder.load(ctx(tmp_path, "val"))
    assert len(train) == 13 and len(val) == 5 and val.num_classes == 3
    rows = {bytes(x): i for i, x in enumerate(full.x)}
    t_idx, v_idx = [rows[bytes(x)] for x in train.x], [rows[bytes(x)] for x in val.x]
    assert sorted(t_idx + v_idx) == list(range(18)) and t_idx == sorted(t_idx) and v_idx == sorted(v_idx)
    assert np.array_equal(val.y, full.y[v_idx]) and len(set(val.y.tolist())) > 1  # not just the last class
    again = make(registry, "image-folder", train="train", val_from_train=5).load(DatasetContext("val", 7, tmp_path))
    assert again.key == val.key  # independent of the run's seed
    limited = make(registry, "image-folder", train="train", limit=4).load(ctx(tmp_path, "train"))
    assert len(limited) == 4 and set(map(bytes, limited.x)) <= set(rows)


def test_modes_and_sizes(registry, tmp_path):
    grey = save(tmp_path / "g" / "k" / "a.png", np.arange(20, dtype=np.uint8).reshape(5, 4))
    assert np.array_equal(make(registry, "image-folder", test="g", mode="L").load(ctx(tmp_path)).x[0], grey)
    assert np.array_equal(make(registry, "image-folder", test="g").load(ctx(tmp_path)).x[0], np.repeat(grey, 3, 0))
    rgb = save(tmp_path / "c" / "k" / "a.png", np.full((5, 4, 3), (255, 0, 0), np.uint8))
    assert rgb.shape == (3, 5, 4)
    assert make(registry, "image-folder", test="c", mode="L").load(ctx(tmp_path)).x[0].max() == 76  # 0.299 * 255
    save(tmp_path / "g" / "k" / "b.png", np.zeros((6, 4), np.uint8))
    with pytest.raises(PluginError, match=r"b\.png: size 4x6 \(W x H\) differs from 4x5.*one size"):
        make(registry, "image-folder", test="g", mode="L").load(ctx(tmp_path))


# ---- flat folders and failure-source use -----------------------------------------------------
def test_flat_folder_as_failure_source_is_converted_in_name_order(registry, tmp_path):
    rng = np.random.default_rng(3)
    big = save(tmp_path / "flat" / "b.png", rng.integers(0, 256, (16, 12, 3), dtype=np.uint8))
    small = save(tmp_path / "flat" / "a.jpg", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    exact = save(tmp_path / "flat" / "c.PNG", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    ood = make(registry, "image-folder", test="flat").load(ctx(tmp_path, image_shape=(1, 8, 8), size=100))
    assert ood.x.shape == (3, 1, 8, 8) and ood.y is None and ood.name == "flat"
    small_decoded = np.asarray(Image.open(tmp_path / "flat" / "a.jpg"))[None]  # JPEG is lossy: compare with PIL's decode
    assert np.array_equal(ood.x[0], to_format(np.repeat(small_decoded, 3, 0)[None], (1, 8, 8))[0])
    assert np.array_equal(ood.x[1], to_format(big[None], (1, 8, 8))[0])
    assert np.array_equal(ood.x[2], to_format(exact[None], (1, 8, 8))[0])
    with pytest.raises(PluginError, match="flat folder of images without labels"):
        make(registry, "image-folder", test="flat").load(ctx(tmp_path))
    (tmp_path / "flat" / "sub").mkdir()
    with pytest.raises(PluginError, match="holds both images and subfolders"):
        make(registry, "image-folder", test="flat").load(ctx(tmp_path, image_shape=(1, 8, 8)))


def test_missing_folders_and_bad_options(registry, tmp_path):
    with pytest.raises(MissingDataError, match=f"folder for split 'test' not found: {tmp_path / 'nope'}"):
        make(registry, "image-folder", test="nope").load(ctx(tmp_path, image_shape=(3, 8, 8)))
    with pytest.raises(PluginError, match="no folder given for split 'train'"):
        make(registry, "image-folder", test="x").load(ctx(tmp_path, "train"))
    with pytest.raises(UnknownPluginError, match="dataset 'image-folder' has no option root; options: train, val, test"):
        make(registry, "image-folder", root="x")
    with pytest.raises(PluginError, match="either a 'val' folder or 'val_from_train'"):
        make(registry, "image-folder", val="v", val_from_train=3)
    with pytest.raises(PluginError, match="'mode' must be"):
        make(registry, "image-folder", mode="CMYK")
    (tmp_path / "empty" / "k").mkdir(parents=True)
    with pytest.raises(PluginError, match=f"class folder {tmp_path / 'empty' / 'k'} holds no images"):
        make(registry, "image-folder", test="empty").load(ctx(tmp_path, image_shape=(3, 8, 8)))


# ---- ODIN folders ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ODIN))
def test_missing_odin_folder_names_it_and_the_download(registry, tmp_path, name):
    with pytest.raises(MissingDataError) as info:
        make(registry, name).load(ctx(tmp_path, image_shape=(3, 32, 32)))
    message = str(info.value)
    assert f"folder not found: {tmp_path / ODIN[name]}." in message
    assert f"https://www.dropbox.com/s/" in message and f"/{ODIN[name]}.tar.gz" in message
    assert "github.com/facebookresearch/odin" in message


def test_odin_folder_is_read_as_released(registry, tmp_path):
    rng = np.random.default_rng(4)
    for i in range(3):  # iSUN.tar.gz extracts to iSUN/<one subfolder>/*.jpeg
        save(tmp_path / "iSUN" / "iSUN_patches" / f"im{i}.jpeg", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    isun = make(registry, "isun")
    ood = isun.load(ctx(tmp_path, image_shape=(3, 32, 32)))
    decoded = [np.asarray(Image.open(tmp_path / "iSUN" / "iSUN_patches" / f"im{i}.jpeg")).transpose(2, 0, 1) for i in range(3)]
    assert ood.y is None and np.array_equal(ood.x, np.stack(decoded))
    assert len(make(registry, "isun", limit=2).load(ctx(tmp_path, image_shape=(3, 32, 32)))) == 2
    with pytest.raises(PluginError, match="isun is an out-of-distribution set"):
        isun.load(ctx(tmp_path, "train"))


def test_list_shows_every_new_dataset_with_its_docstring_summary(registry, capsys):
    assert main(["list", "datasets", "--json"]) == 0
    listed = {d["name"]: d for d in json.loads(capsys.readouterr().out)["datasets"]}
    for name in ["image-folder", *ODIN, "cifar10", "cifar100", "svhn", "mnist", "fashion-mnist"]:
        doc = registry.get("datasets", name).target.__doc__.strip().splitlines()[0]
        assert listed[name]["summary"] == doc and listed[name]["provider"] == "oodbench", name
