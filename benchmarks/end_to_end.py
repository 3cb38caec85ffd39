"""An oodbench run timed against a plain PyTorch loop that does only the network passes it needs.

Issue #9's end-to-end target: on a GPU, a paper-scale run (DenseNet-BC-100, every detector but
the pixel models, every source, one seed) within 1.5x of a plain script that does exactly the
passes the run needs and nothing else (MEASUREMENTS.md: 234 s fp32, 179 s bf16 on an H100).

1. The classifier is trained (or loaded) into a temporary cache first, untimed: neither side
   pays for training.
2. oodbench runs the benchmark with that cache (every other task is computed), timed.
3. The plain baseline: the run's minimum passes (``passes_report.run_minimum``: one forward
   per extracted image, the attacks' passes, the gradient detectors' minimum), done as bare
   ``network(x)`` under ``inference_mode`` and ``autograd.grad`` of a scalar per batch, on
   random images of the right shape, at the batch size the run used, same device and
   ``--bf16``/``--channels-last``. It has no data loading, no caching, no detector
   arithmetic (EM, Mahalanobis' covariances, ...): the ratio charges all of that to oodbench.

Without a GPU or the paper's data, use a benchmark file of the right shapes (e.g. the npz
example) and say so. The quick mode in the test suite runs a small digits benchmark.

    python benchmarks/end_to_end.py --benchmark cifar10 --data-dir DIR \\
        --detectors msp,logits,temperature,odin,mahalanobis,gmm,gmm-1000,zheng,vae,maf --out e2e.json
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import passes_report  # noqa: E402  (a script folder, not a package)

from oodbench.api import DatasetContext  # noqa: E402
from oodbench.benchmark import Benchmark  # noqa: E402
from oodbench.cache import checksum_path  # noqa: E402
from oodbench.cli import parse_detectors  # noqa: E402
from oodbench.plugins import Registry, build_registry, instantiate  # noqa: E402
from oodbench.runner import RunOptions, choose_device, run_benchmark, train_classifiers  # noqa: E402


def plain_passes(network: torch.nn.Module, image_shape: tuple[int, ...], forward: int, forward_backward: int,
                 batch_sizes: dict[str, int], device: torch.device, bf16: bool = False, channels_last: bool = False,
                 seed: int = 0) -> float:
    """Seconds for ``forward`` images of inference and ``forward_backward`` images of input gradients.

    ``batch_sizes``: images per pass by kind (``forward``, ``forward_backward``), as the run used them.
    """
    network = network.to(device).eval()
    memory = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(memory_format=memory)
    images = torch.rand(max(batch_sizes.values()), *image_shape, generator=torch.Generator().manual_seed(seed))
    images = images.to(device).contiguous(memory_format=memory)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def sizes(total: int, kind: str):
        step = batch_sizes[kind]
        return [min(step, total - start) for start in range(0, total, step)]

    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronise()
    started = time.perf_counter()
    with torch.inference_mode(), autocast:
        for n in sizes(forward, "forward"):
            network(images[:n])
    for n in sizes(forward_backward, "forward_backward"):
        x = images[:n].detach().requires_grad_(True)
        with autocast:
            value = network(x).float().log_softmax(1).max(1).values.sum()
        torch.autograd.grad(value, x)
    synchronise()
    return time.perf_counter() - started


def _network(bench: Benchmark, registry: Registry, data_dir: Path, image_shape: tuple[int, ...],
             num_classes: int) -> torch.nn.Module:
    model = instantiate(registry.get("models", bench.model.plugin), bench.model.options)
    model.data_dir = data_dir
    return model.build(image_shape, num_classes, 0)


def measure(bench: Benchmark, registry: Registry, detectors: str, data_dir: Path, device: torch.device,
            bf16: bool = False, channels_last: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="oodbench-e2e-") as cache:
        opts = RunOptions(benchmark=bench, detectors=parse_detectors(detectors), seeds=[0], cache_dir=Path(cache),
                          data_dir=data_dir, device=device, progress=False, bf16=bf16, channels_last=channels_last)
        trained = train_classifiers(replace(opts, detectors=[]), registry)[0]
        # Only the weights (and their checksum record) may be reused: the test split's outputs that training
        # measured go too.
        weights = Path(trained["file"])
        for entry in Path(cache).rglob("*"):
            if entry.is_file() and entry.name not in (weights.name, checksum_path(weights).name):
                entry.unlink()
        started = time.perf_counter()
        result = run_benchmark(opts, registry)
        oodbench_seconds = time.perf_counter() - started
    seed_meta = result.meta["per_seed"][0]
    minimum, _ = passes_report.run_minimum(result, bench, registry, data_dir, seed_meta)
    least = {kind: sum(int(c.get(kind, 0)) for c in minimum.values()) for kind in ("forward", "forward_backward")}
    measured = {kind: sum(c[kind] for c in seed_meta["passes"].values()) for kind in ("forward", "forward_backward")}
    image_shape, num_classes = _in_distribution_format(bench, registry, data_dir)
    network = _network(bench, registry, data_dir, image_shape, num_classes)
    batch_sizes = seed_meta["batch_size"]["used"]
    baseline_seconds = plain_passes(network, image_shape, least["forward"], least["forward_backward"], batch_sizes,
                                    device, bf16=bf16 and device.type == "cuda",
                                    channels_last=channels_last and device.type == "cuda")
    return {"benchmark": bench.name, "detectors": detectors, "device": str(device),
            "numerics": seed_meta["numerics"]["used"], "torch_threads": torch.get_num_threads(),
            "batch_sizes": batch_sizes, "passes_minimum": least, "passes_measured": measured,
            "oodbench_seconds": oodbench_seconds, "plain_baseline_seconds": baseline_seconds,
            "ratio": oodbench_seconds / baseline_seconds if baseline_seconds else math.inf,
            "rows": len(result.rows), "errors": sum(r["status"] != "ok" for r in result.rows)}


def _in_distribution_format(bench: Benchmark, registry: Registry, data_dir: Path) -> tuple[tuple[int, ...], int]:
    dataset = instantiate(registry.get("datasets", bench.in_distribution.plugin), bench.in_distribution.options, seed=0)
    val = dataset.load(DatasetContext(split="val", seed=0, data_dir=data_dir))
    return val.image_shape, int(val.num_classes)


def main(argv: list[str] | None = None) -> int:
    parser = passes_report.run_arguments(__doc__.splitlines()[0],
                                         "msp,logits,temperature,odin,mahalanobis,gmm,zheng,vae,maf")
    args = parser.parse_args(argv)
    registry = build_registry(strict=True)
    result = measure(passes_report.benchmark_named(registry, args.benchmark), registry, args.detectors,
                     args.data_dir, choose_device(args.device), args.bf16, args.channels_last)
    print(f"{result['benchmark']} on {result['device']} ({result['numerics']}): oodbench "
          f"{result['oodbench_seconds']:.1f} s, plain passes {result['plain_baseline_seconds']:.1f} s, "
          f"ratio {result['ratio']:.2f}x; passes measured {result['passes_measured']} vs minimum "
          f"{result['passes_minimum']}; {result['errors']} error rows of {result['rows']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
