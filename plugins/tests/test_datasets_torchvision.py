"""torchvision-backed datasets (cifar10, cifar100, svhn, mnist, fashion-mnist) on tiny files in torchvision's formats.

Offline: each test writes a few images in the exact on-disk format torchvision parses
(CIFAR's python pickle batches, MNIST's raw idx files, SVHN's .mat) and checks that pixels and
labels come back exactly, that splits are carved as documented, and that missing or wrong files
give clear errors.

torchvision verifies the md5 of the CIFAR batches and of the SVHN .mat files against the
official releases, which tiny fakes cannot match. The ``*_md5_of_fakes`` fixtures therefore
monkeypatch torchvision's *expected* md5 lists (class attributes) with the md5s of the fake
files, so torchvision's integrity check still runs on every read;
``test_cifar_files_that_fail_torchvision_md5_check_are_reported`` runs without the patch and
shows the real md5s are enforced. MNIST's raw files are only checked for existence by
torchvision, so they need no patch.
"""
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import scipy.io
import torchvision.datasets as tvd
from torchvision_fakes import write_cifar10, write_cifar100, write_mnist, write_svhn

from oodbench.api import DatasetContext, MissingDataError, PluginError
from oodbench.plugins import OptionError, UnknownPluginError, instantiate, resolve_options
from oodbench_plugins.datasets.convert import to_format

TV_SETS = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist")


def make(registry, name, **options):
    return instantiate(registry.get("datasets", name), options, seed=0)


def ctx(data_dir, split="test", **kw):
    return DatasetContext(split=split, seed=0, data_dir=Path(data_dir), **kw)


# ---- CIFAR -----------------------------------------------------------------------------------
def test_cifar10_pixels_labels_and_val_split_round_trip(registry, tmp_path, cifar_md5_of_fakes):
    train_x, train_y, test_x, test_y = write_cifar10(tmp_path)
    cifar_md5_of_fakes(tmp_path)
    cifar = make(registry, "cifar10", val_size=3)
    train, val, test = (cifar.load(ctx(tmp_path, s)) for s in ("train", "val", "test"))
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64 and train.x.flags.c_contiguous
    assert train.x.shape == (17, 3, 32, 32) and val.x.shape == (3, 3, 32, 32) and test.x.shape == (6, 3, 32, 32)
    # val is the last val_size training images in file order (the tail of data_batch_5), disjoint from train
    assert np.array_equal(train.x, train_x[:17]) and np.array_equal(val.x, train_x[17:])
    assert np.array_equal(train.y, train_y[:17]) and np.array_equal(val.y, train_y[17:])
    assert not {bytes(a) for a in train.x} & {bytes(a) for a in val.x}
    assert np.array_equal(test.x, test_x) and np.array_equal(test.y, test_y)
    assert train.num_classes == val.num_classes == test.num_classes == 10
    assert np.array_equal(make(registry, "cifar10", val_size=3, limit=2).load(ctx(tmp_path, "val")).x, train_x[17:19])


def test_cifar100_reads_fine_labels(registry, tmp_path, cifar_md5_of_fakes):
    train_x, train_fine, test_x, test_fine = write_cifar100(tmp_path)
    cifar_md5_of_fakes(tmp_path, tvd.CIFAR100)
    cifar = make(registry, "cifar100", val_size=4)
    train, val, test = (cifar.load(ctx(tmp_path, s)) for s in ("train", "val", "test"))
    assert np.array_equal(train.x, train_x[:6]) and np.array_equal(val.y, train_fine[6:])
    assert np.array_equal(test.x, test_x) and np.array_equal(test.y, test_fine) and test.num_classes == 100


def test_as_a_failure_source_the_test_set_takes_the_in_distribution_format(registry, tmp_path, cifar_md5_of_fakes):
    _, _, test_x, _ = write_cifar10(tmp_path)
    cifar_md5_of_fakes(tmp_path)
    ood = make(registry, "cifar10").load(ctx(tmp_path, image_shape=(1, 8, 8), size=99))
    assert ood.x.shape == (6, 1, 8, 8) and ood.x.dtype == np.uint8 and ood.y is None
    assert np.array_equal(ood.x, to_format(test_x, (1, 8, 8)))


def test_cifar_files_that_fail_torchvision_md5_check_are_reported(registry, tmp_path):
    write_cifar10(tmp_path)  # no md5 patch: torchvision compares with the official release and refuses
    with pytest.raises(PluginError, match="md5") as info:
        make(registry, "cifar10").load(ctx(tmp_path))
    assert not isinstance(info.value, MissingDataError)
    assert str(tmp_path / "cifar-10-batches-py") in str(info.value)


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"), ("svhn", ""),
])
def test_missing_files_name_the_folder_and_the_way_out(registry, tmp_path, name, expected):
    with pytest.raises(MissingDataError) as info:
        make(registry, name).load(ctx(tmp_path))
    message = str(info.value)
    assert f"from {tmp_path / expected}:" in message and "download = true" in message
    assert {"cifar10": "data_batch_1", "cifar100": "train", "mnist": "t10k-images-idx3-ubyte",
            "fashion-mnist": "train-labels-idx1-ubyte", "svhn": "test_32x32.mat"}[name] in message


def test_one_missing_cifar_batch_is_named(registry, tmp_path, cifar_md5_of_fakes):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(MissingDataError, match="1 of the 7 files .* missing .*: data_batch_3\\. "):
        make(registry, "cifar10").load(ctx(tmp_path))


def test_root_is_read_relative_to_data_dir_or_absolute(registry, tmp_path, cifar_md5_of_fakes):
    _, _, test_x, _ = write_cifar10(tmp_path / "sets" / "cifar")
    cifar_md5_of_fakes(tmp_path / "sets" / "cifar")
    assert np.array_equal(make(registry, "cifar10", root="sets/cifar").load(ctx(tmp_path)).x, test_x)
    assert np.array_equal(make(registry, "cifar10", root=str(tmp_path / "sets" / "cifar")).load(ctx("/nonexistent")).x, test_x)
    with pytest.raises(MissingDataError, match=str(tmp_path / "cifar-10-batches-py")):
        make(registry, "cifar10").load(ctx(tmp_path))


# ---- MNIST / Fashion-MNIST -------------------------------------------------------------------
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_idx_files_round_trip(registry, tmp_path, name, folder):
    train_x, train_y, test_x, test_y = write_mnist(tmp_path, folder)
    mnist = make(registry, name, val_size=5)
    train, val, test = (mnist.load(ctx(tmp_path, s)) for s in ("train", "val", "test"))
    assert train.x.shape == (7, 1, 28, 28) and train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert np.array_equal(train.x, train_x[:7]) and np.array_equal(val.x, train_x[7:])
    assert np.array_equal(train.y, train_y[:7]) and np.array_equal(val.y, train_y[7:])
    assert np.array_equal(test.x, test_x) and np.array_equal(test.y, test_y) and test.num_classes == 10
    ood = mnist.load(ctx(tmp_path, image_shape=(3, 28, 28)))  # grey -> RGB by repetition, same size: exact
    assert ood.y is None and np.array_equal(ood.x, np.repeat(test_x, 3, axis=1))


def test_download_is_passed_to_torchvision(registry, tmp_path, monkeypatch):
    calls = []

    def fake_download(self):  # what torchvision's download leaves behind, without the network
        calls.append(self.root)
        if not (tmp_path / "MNIST").exists():
            write_mnist(tmp_path)

    monkeypatch.setattr(tvd.MNIST, "download", fake_download)
    with pytest.raises(MissingDataError):
        make(registry, "mnist").load(ctx(tmp_path))
    assert calls == []
    assert len(make(registry, "mnist", download=True).load(ctx(tmp_path)).x) == 5 and calls == [str(tmp_path)]

    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    with pytest.raises(PluginError, match=f"could not download or read the files in {tmp_path / 'FashionMNIST/raw'}.*no network"):
        make(registry, "fashion-mnist", download=True).load(ctx(tmp_path))


# ---- SVHN ------------------------------------------------------------------------------------
def test_svhn_mat_round_trips_with_label_10_as_digit_0(registry, tmp_path, svhn_md5_of_fakes):
    x, y = write_svhn(tmp_path, "test")
    svhn_md5_of_fakes(tmp_path, "test")
    test = make(registry, "svhn").load(ctx(tmp_path))  # only the test file is needed for the test split
    assert test.x.shape == (7, 3, 32, 32) and test.x.dtype == np.uint8
    assert np.array_equal(test.x, x.transpose(3, 2, 0, 1))  # X[h, w, c, n] -> x[n, c, h, w]
    assert np.array_equal(test.y, y[:, 0] % 10) and 0 in test.y and test.y.max() <= 9
    write_svhn(tmp_path, "train", n=9, seed=4)
    svhn_md5_of_fakes(tmp_path, "train")
    val = make(registry, "svhn", val_size=2).load(ctx(tmp_path, "val"))
    assert np.array_equal(val.x, scipy.io.loadmat(tmp_path / "train_32x32.mat")["X"].transpose(3, 2, 0, 1)[7:])


# ---- options ---------------------------------------------------------------------------------
def test_documented_defaults_and_bad_options(registry, tmp_path):
    for name in TV_SETS:
        entry = registry.get("datasets", name)
        assert resolve_options(entry, {}) == {"root": "", "download": False, "val_size": 5000, "limit": 0,
                                            "classes": (), "complement": False}
        assert entry.target.splits == ("train", "val", "test")
        with pytest.raises(UnknownPluginError, match=f"dataset '{name}' has no option bogus; options: root, download, val_size, limit, classes, complement"):
            make(registry, name, bogus=1)
    with pytest.raises(PluginError, match="'val_size' must be an integer >= 0, got -1"):
        make(registry, "cifar10", val_size=-1)
    with pytest.raises(OptionError, match="dataset 'mnist' option download='yes': expected true or false"):
        make(registry, "mnist", download="yes")


def test_val_size_must_leave_training_images(registry, tmp_path):
    write_mnist(tmp_path)  # 12 training images: the default val_size 5000 cannot be carved
    with pytest.raises(PluginError, match="val_size = 5000 must be smaller than the 12 training images"):
        make(registry, "mnist").load(ctx(tmp_path, "train"))
    with pytest.raises(PluginError, match="val_size = 0 leaves no validation split"):
        make(registry, "mnist", val_size=0).load(ctx(tmp_path, "val"))
    assert len(make(registry, "mnist", val_size=0).load(ctx(tmp_path, "train"))) == 12


def test_held_out_classes_split_cifar100_into_seen_and_unseen(registry, tmp_path, cifar_md5_of_fakes):
    train_x, train_fine, test_x, test_fine = write_cifar100(tmp_path, n_train=60, n_test=40)
    cifar_md5_of_fakes(tmp_path, tvd.CIFAR100)
    seen = list(range(99, 19, -1))  # 80 classes, in an order that makes the re-indexing visible
    known = make(registry, "cifar100", val_size=5, classes=seen)
    train = known.load(ctx(tmp_path, "train"))
    kept = np.isin(train_fine, seen)
    assert train.num_classes == 80
    assert np.array_equal(train.x, train_x[kept][:-5])
    assert [seen[label] for label in train.y] == train_fine[kept][:-5].tolist()
    unseen = make(registry, "cifar100", classes=seen, complement=True).load(ctx(tmp_path, image_shape=(3, 32, 32)))
    assert np.array_equal(unseen.x, test_x[test_fine < 20]) and unseen.y is None
    with pytest.raises(PluginError, match="use it as a failure source"):
        make(registry, "cifar100", classes=seen, complement=True).load(ctx(tmp_path, "test"))
    for bad in ([3, 3], [100]):
        with pytest.raises(PluginError, match="distinct labels in 0..99"):
            make(registry, "cifar100", classes=bad)
