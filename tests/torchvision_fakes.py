"""Tiny files in the exact on-disk formats torchvision parses (CIFAR pickles, MNIST idx, SVHN .mat).

Shared by the dataset and benchmark tests; the fixtures that make torchvision accept their
md5s are in conftest.py.
"""
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import scipy.io


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar10(root: Path, per_batch=4, n_test=6, seed=0):
    """Five training batches of ``per_batch`` images and a test batch; returns (train x, y, test x, y) as NCHW."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        rows = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)  # CIFAR rows: R plane, G plane, B plane
        labels = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": rows, "labels": labels, "filenames": [f"{i}.png" for i in range(n)]}, f)
        xs.append(rows.reshape(n, 3, 32, 32))
        ys.append(np.array(labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch}, f)
    return np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5]


def write_cifar100(root: Path, n_train=10, n_test=4, seed=1):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        rows = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "fine_labels": fine, "coarse_labels": coarse}, f)
        out += [rows.reshape(n, 3, 32, 32), np.array(fine)]
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return out


def write_idx(path: Path, array: np.ndarray):
    """MNIST's idx format: big-endian magic (0, 0, 0x08 = uint8, ndim), big-endian int32 dims, raw bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
                     + np.ascontiguousarray(array, np.uint8).tobytes())


def write_mnist(root: Path, folder="MNIST", n_train=12, n_test=5, seed=2):
    rng = np.random.default_rng(seed)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", x)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", y)
        out += [x[:, None], y]
    return out


def write_svhn(root: Path, split="test", n=7, seed=3):
    """SVHN's .mat: X is H x W x C x N uint8, y is N x 1 with labels 1..10 (10 = digit 0)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = ((np.arange(n) + 8) % 10 + 1).astype(np.uint8)[:, None]  # 9, 10, 1, 2, ...: includes 10
    scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return x, y
