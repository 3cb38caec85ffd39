"""oodbench against pytorch-ood 0.4 in one process: network passes, seconds and AUROCs.

Both sides get the same network (the pretrained ResNet-20 in ``shared/models``, built by
oodbench's ``cifar-resnet`` plugin; it maps [0, 1] images to logits and normalises inside),
the same images (read by oodbench's ``npz`` plugin: CIFAR-10 train and test, MNIST turned
into 32x32 RGB) and the same detectors:

============================  ===================================  ======================
method                        oodbench                             pytorch-ood
============================  ===================================  ======================
MSP                           ``msp``                              ``MaxSoftmax``
ODIN, T = 1000, eps = 0.0014  ``odin-nood``, one-point grid        ``ODIN``
Mahalanobis, penultimate      ``mahalanobis``                      ``Mahalanobis``
feature density (two models)  ``gmm``: class-agnostic diagonal     ``GMM``: one full-
                              GMM, k = 100                         covariance Gaussian
                                                                   per class
============================  ===================================  ======================

eps is in pixel units on both sides, since both perturb the network's [0, 1] input. The
feature densities are different models; their AUROCs are reported, not expected to match.

pytorch-ood runs through its input-level API as its examples use it: ``fit(train_loader)``
and ``predict(x)`` per batch, each detector on its own, so each reruns the network. (Its
``fit_features``/``predict_features`` interface lets a user share one pass by hand; sharing
it is what oodbench does for every detector.) Passes are counted by wrapping the network:
a forward with gradients enabled on an input that requires them counts as forward+backward.
oodbench runs through ``run_benchmark`` with the cache disabled, so nothing is reused; its
passes come from ``run.json``'s counts. The comparison benchmark
(``cifar10-resnet20-vs-pytorch-ood.toml``) holds nothing out, so every row evaluates on
exactly the images pytorch-ood scores. A fixed-(T, eps) ODIN is therefore ``odin-nood`` with a
one-point grid (``odin`` tunes on a holdout of each source); ``odin-nood`` still runs its
validation search over that one point, FGSM images of the val split included, and those
passes are counted against oodbench.

Sizes: full: fit on 3,500 CIFAR-10 train images (oodbench also extracts 500 val images),
score all 10,000 test images (the JPEG copy, see shared/data/PROVENANCE.md) and all 10,000
MNIST test images. ``--quick`` (for tests): fit on 1,000, 100 val, score the 100 exact test
images and 200 MNIST images. Timings: oodbench runs first, then pytorch-ood, after one
warm-up batch; each side's seconds include reading its images and building its network.

    python benchmarks/compare_pytorch_ood.py [--quick] [--out results.json] [--shared DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from oodbench.api import DatasetContext, ImageSet
from oodbench.benchmark import Benchmark, load_benchmark
from oodbench.cli import parse_detectors
from oodbench.plugins import Registry, build_registry, instantiate
from oodbench.runner import RunOptions, run_benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
import passes_report  # noqa: E402  (this folder is scripts, not a package)

HERE = Path(__file__).resolve().parent
BENCHMARK = HERE / "cifar10-resnet20-vs-pytorch-ood.toml"
TEMPERATURE, EPSILON = 1000.0, 0.0014
#: method -> (oodbench detector as --detectors takes it, pytorch-ood class, whether both compute the same score)
PAIRS = {
    "msp": ("msp", "MaxSoftmax", True),
    "odin": (f"odin-nood[temperatures=({TEMPERATURE},),epsilons=({EPSILON},)]", "ODIN", True),
    "mahalanobis": ("mahalanobis", "Mahalanobis", True),
    "feature-density": ("gmm", "GMM", False),
}


def default_shared_dir() -> Path:
    return Path(os.environ.get("OODBENCH_SHARED_DIR", HERE.parent.parent / "shared"))


def comparison_benchmark(quick: bool) -> Benchmark:
    bench = load_benchmark(BENCHMARK)
    if not quick:
        return bench
    idd = bench.in_distribution
    mnist = bench.ood[0]
    # The JPEG test file is sorted by class; the exact first-100 file is in the original, mixed order.
    small_id = replace(idd, options={**idd.options, "test": "data/cifar10_test_exact_first100.npz",
                                     "val_from_train": 100, "limit": 1000})
    return replace(bench, in_distribution=small_id, ood=(replace(mnist, options={**mnist.options, "limit": 200}),))


def load_images(bench: Benchmark, registry: Registry, data_dir: Path) -> dict[str, ImageSet]:
    """Train, test and OOD images exactly as the oodbench run reads them (seed 0)."""
    ref = bench.in_distribution
    dataset = instantiate(registry.get("datasets", ref.plugin), ref.options, seed=0)
    images = {split: dataset.load(DatasetContext(split=split, seed=0, data_dir=data_dir)) for split in ("train", "test")}
    ood = bench.ood[0]
    source = instantiate(registry.get("datasets", ood.dataset), ood.options, seed=0)
    images["ood"] = source.load(DatasetContext(split="test", seed=0, data_dir=data_dir,
                                               image_shape=images["test"].image_shape, size=len(images["test"])))
    return images


def build_network(bench: Benchmark, registry: Registry, data_dir: Path, images: ImageSet) -> torch.nn.Module:
    model = instantiate(registry.get("models", bench.model.plugin), bench.model.options)
    model.data_dir = data_dir
    return model.build(images.image_shape, images.num_classes, 0).eval()


class CountingNetwork(torch.nn.Module):
    """The network as pytorch-ood sees it, counting images: ``forward`` gives logits, ``features`` penultimate features."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.passes = {"forward": 0, "forward_backward": 0}

    def _count(self, x: torch.Tensor) -> None:
        self.passes["forward_backward" if torch.is_grad_enabled() and x.requires_grad else "forward"] += len(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        return self.network(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._count(x)
        return self.network.forward_features(x)[1]


def run_pytorch_ood(bench: Benchmark, registry: Registry, data_dir: Path) -> dict[str, Any]:
    """Fit each detector on the train loader and score test and OOD batches through ``predict``."""
    import pytorch_ood
    from pytorch_ood.detector import GMM, ODIN, Mahalanobis, MaxSoftmax
    from pytorch_ood.metrics.functional import auroc

    started = time.perf_counter()
    images = load_images(bench, registry, data_dir)
    net = CountingNetwork(build_network(bench, registry, data_dir, images["train"]))

    def loader(image_set: ImageSet, labels: np.ndarray) -> DataLoader:
        dataset = TensorDataset(image_set.tensor(), torch.tensor(labels, dtype=torch.long))  # a copy: labels are read-only
        return DataLoader(dataset, batch_size=bench.batch_size, shuffle=False)

    train = loader(images["train"], images["train"].y)
    # One loader per set, as oodbench extracts per set: batches never mix test and OOD images.
    scored = [loader(images["test"], images["test"].y), loader(images["ood"], np.full(len(images["ood"]), -1))]
    labels = torch.cat([y for each in scored for _, y in each])
    detectors = {
        "MaxSoftmax": MaxSoftmax(net),
        "ODIN": ODIN(net, eps=EPSILON, temperature=TEMPERATURE),
        "Mahalanobis": Mahalanobis(net.features),
        "GMM": GMM(net.features),
    }
    by_detector: dict[str, Any] = {}
    for name, detector in detectors.items():
        before, clock = dict(net.passes), time.perf_counter()
        detector.fit(train)  # a no-op for detectors that need no fitting
        fit = _difference(net.passes, before), time.perf_counter() - clock
        before, clock = dict(net.passes), time.perf_counter()
        outlier = []
        for each in scored:
            for x, _ in each:
                if name == "ODIN":  # input gradients: must not run under no_grad
                    outlier.append(detector.predict(x).detach())
                else:
                    with torch.no_grad():
                        outlier.append(detector.predict(x))
        scores = torch.cat(outlier)
        by_detector[name] = {"fit_passes": fit[0], "fit_seconds": fit[1],
                             "predict_passes": _difference(net.passes, before),
                             "predict_seconds": time.perf_counter() - clock,
                             "auroc": float(auroc(scores, labels)),
                             # ties decide AUROC where float32 saturates (MEASUREMENTS.md); oodbench scores in float64
                             "distinct_scores": int(scores.unique().numel()), "scores": int(scores.numel())}
    return {"version": pytorch_ood.__version__, "seconds": time.perf_counter() - started,
            "passes": _with_total(net.passes), "detectors": by_detector,
            "images": {"train": len(images["train"]), "test": len(images["test"]), "ood:mnist": len(images["ood"])}}


def run_oodbench(bench: Benchmark, registry: Registry, data_dir: Path) -> dict[str, Any]:
    opts = RunOptions(benchmark=bench, detectors=parse_detectors(",".join(p[0] for p in PAIRS.values())), seeds=[0],
                      cache_dir=None, data_dir=data_dir, device=torch.device("cpu"), progress=False)
    started = time.perf_counter()
    result = run_benchmark(opts, registry)
    seconds = time.perf_counter() - started
    seed = result.meta["per_seed"][0]
    passes = {kind: sum(c[kind] for c in seed["passes"].values()) for kind in ("forward", "forward_backward")}
    fit_seconds = {t["detector"]: t["fit_seconds"] for t in result.timings}
    return {"seconds": seconds, "passes": _with_total(passes), "passes_by_activity": seed["passes"],
            "passes_against_minimum": passes_report.report(result, bench, registry, data_dir)[0]["passes"]["groups"],
            "detectors": {r["detector"]: {"auroc": r["auroc"], "status": r["status"], "fit_seconds": fit_seconds[r["detector"]],
                                          "score_seconds": sum(t["score_seconds"] for t in result.timings if t["detector"] == r["detector"])}
                          for r in result.rows if r["source"] == "ood:mnist"}}


def _difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def _with_total(passes: dict[str, int]) -> dict[str, int]:
    """Adds ``network_forwards``: every image through the network, the forward half of forward+backward included."""
    return {**passes, "network_forwards": passes["forward"] + passes["forward_backward"]}


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
             if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "numpy": np.__version__}


def warm_up(bench: Benchmark, registry: Registry, data_dir: Path) -> None:
    """One forward and one forward+backward batch: first calls pay for kernel setup (measured: ~0.7 s), neither side should."""
    images = load_images(bench, registry, data_dir)["test"]
    network = build_network(bench, registry, data_dir, images)
    x = images.tensor(slice(0, bench.batch_size))
    with torch.inference_mode():
        network(x)
    torch.autograd.grad(network(x.requires_grad_()).sum(), x)


def compare(shared_dir: Path, quick: bool = False) -> dict[str, Any]:
    """Run both sides on the files under ``shared_dir`` and return the comparison (see the module docstring)."""
    registry = build_registry(strict=True)
    bench = comparison_benchmark(quick)
    warm_up(bench, registry, shared_dir)
    load_before = os.getloadavg()
    ours = run_oodbench(bench, registry, shared_dir)
    theirs = run_pytorch_ood(bench, registry, shared_dir)
    auroc = {}
    for method, (spec, cls, same) in PAIRS.items():
        label = parse_detectors(spec)[0].label
        a, b = ours["detectors"][label]["auroc"], theirs["detectors"][cls]["auroc"]
        auroc[method] = {"oodbench": label, "pytorch_ood": cls, "same_method": same,
                         "auroc_oodbench": a, "auroc_pytorch_ood": b, "difference": a - b}
    return {
        "mode": "quick" if quick else "full", "machine": machine(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "images": {**theirs["images"], "val_oodbench_only": ours["passes_by_activity"]["extract:val"]["forward"]},
        "oodbench": ours, "pytorch_ood": theirs, "auroc": auroc,
        "ratios": {"network_forwards (pytorch-ood / oodbench)":
                   theirs["passes"]["network_forwards"] / ours["passes"]["network_forwards"],
                   "forward_backward (pytorch-ood / oodbench)":
                   theirs["passes"]["forward_backward"] / ours["passes"]["forward_backward"],
                   "seconds (pytorch-ood / oodbench)": theirs["seconds"] / ours["seconds"]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for tests")
    parser.add_argument("--out", help="write the comparison as JSON here")
    parser.add_argument("--shared", type=Path, default=default_shared_dir(),
                        help="folder holding data/ and models/ (default: $OODBENCH_SHARED_DIR or ../shared)")
    args = parser.parse_args(argv)
    result = compare(args.shared, quick=args.quick)
    result["command"] = " ".join(["python", "benchmarks/compare_pytorch_ood.py", *(sys.argv[1:] if argv is None else argv)])
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    summary = {k: result[k] for k in ("mode", "ratios", "auroc")}
    summary["passes"] = {side: result[side]["passes"] for side in ("oodbench", "pytorch_ood")}
    summary["seconds"] = {side: result[side]["seconds"] for side in ("oodbench", "pytorch_ood")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
