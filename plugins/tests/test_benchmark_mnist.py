"""ODIN's MNIST benchmark end to end on small files in every on-disk format it reads.

Random pixels stand in for the real sets (no network here); what is checked is the plumbing
the benchmark file promises: MNIST from torchvision's idx files, Omniglot and notMNIST from
their released folder layouts, CIFAR-10 turned grey 28x28, the MLP trained and scored.
"""
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision_fakes import write_cifar10, write_mnist

from oodbench.api import DatasetContext, MissingDataError
from oodbench.benchmark import load_benchmark
from oodbench.cli import parse_detectors
from oodbench.plugins import instantiate
from oodbench.runner import RunOptions, run_benchmark


def write_pngs(folder: Path, n: int, size: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_mnist_benchmark_reads_every_source_and_scores(registry, tmp_path, cifar_md5_of_fakes):
    write_mnist(tmp_path, n_train=300, n_test=120)
    write_cifar10(tmp_path, per_batch=2, n_test=40)
    cifar_md5_of_fakes(tmp_path)
    write_pngs(tmp_path / "omniglot-py" / "images_evaluation" / "Alphabet_a" / "character01", 30, 105, seed=1)
    write_pngs(tmp_path / "notMNIST_small" / "A", 30, 28, seed=2)
    bench = load_benchmark(registry.get("benchmarks", "mnist").target)
    bench = replace(bench, in_distribution=replace(bench.in_distribution, options={"val_size": 60}),
                    model=replace(bench.model, options={"epochs": 2, "hidden": 32}))
    opts = RunOptions(benchmark=bench, detectors=parse_detectors("msp,mahalanobis"), seeds=[0], cache_dir=None,
                      data_dir=tmp_path, device=torch.device("cpu"), progress=False,
                      executor="inline")  # in this process: the md5 patch above does not reach a worker process
    result = run_benchmark(opts, registry)
    sources = result.meta["per_seed"][0]["sources"]
    assert set(sources) == {"mistakes", "ood:omniglot", "ood:notmnist", "ood:cifar10-bw", "ood:gaussian", "ood:uniform"}
    # 120 MNIST test images against 30 Omniglot, 30 notMNIST and 40 CIFAR-10 images, 20% of each side held out
    assert sources["ood:omniglot"] == sources["ood:notmnist"] == {"n_pos": 96, "n_neg": 24, "n_holdout": 24 + 6}
    assert sources["ood:cifar10-bw"] == {"n_pos": 96, "n_neg": 32, "n_holdout": 24 + 8}
    assert all(row["status"] == "ok" for row in result.rows), [(r["source"], r["error"]) for r in result.rows]
    assert len(result.rows) == 2 * len(sources)


def test_mlp_is_the_three_by_256_network(registry):
    model = registry.get("models", "mlp").target()
    network = model.build((1, 28, 28), 10, seed=0)
    # 784*256+256 + 2*(256*256+256) + 256*10+10, counted by hand
    assert sum(p.numel() for p in network.parameters()) == 335_114
    x = torch.rand(4, 1, 28, 28)
    logits, features, layers = network.forward_layers(x)
    assert [tuple(h.shape) for h in layers] == [(4, 256)] * 3 and torch.equal(features, layers[-1])
    assert torch.allclose(logits, network.linear(features)) and isinstance(network.activation, torch.nn.GELU)
    assert torch.allclose(layers[0], torch.nn.functional.gelu(network.hidden[0](((x - 0.5) / 0.5).flatten(1))))


def test_missing_omniglot_and_notmnist_say_how_to_get_them(registry, tmp_path):
    for name, expected in (("omniglot", "omniglot-py/images_evaluation"), ("notmnist", "notMNIST_small")):
        dataset = instantiate(registry.get("datasets", name), {}, seed=0)
        with pytest.raises(MissingDataError, match=f"folder not found: {tmp_path / expected}.*(torchvision|Download)"):
            dataset.load(DatasetContext(split="test", seed=0, data_dir=tmp_path, image_shape=(1, 28, 28), size=10))
