"""Does the fitted batch size hold? Measured memory of a pass against ``oodbench.memory``'s estimate.

For each case (a network at an input size) and kind of pass (forward; forward+backward for
an input gradient), a fresh Python process builds the network, lets ``ClassifierHandle``
probe its bytes per image, warms the pass up on two images, then runs one pass of
``--batch`` images and reads how much the process's peak resident memory grew
(``VmHWM``, Linux only). The batch size oodbench fits is safe when that growth stays under
``ALLOCATOR_OVERHEAD`` times the estimate; the report also gives the batch it would fit on
a 24 GiB CPU machine with nothing else in memory.

    python benchmarks/batch_memory.py --out memory.json                  # the full cases
    python benchmarks/batch_memory.py --cases densenet-bc-100 --batch 32 --kinds forward_backward

Networks are randomly initialised: memory does not depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch

from oodbench import memory
from oodbench.classifier import ClassifierHandle

GIB = 2**30


def _densenet_bc_100() -> torch.nn.Module:
    from oodbench_plugins.models.densenet import DenseNetBC
    return DenseNetBC(depth=100, growth_rate=12).build((3, 32, 32), 10, seed=0)


def _wide_resnet_28_10() -> torch.nn.Module:
    from oodbench_plugins.models.wide_resnet import WideResNet
    return WideResNet(depth=28, widen_factor=10).build((3, 32, 32), 10, seed=0)


class _TorchvisionResNet50(torch.nn.Module):
    """torchvision's ImageNet ResNet-50 with the ``forward_features`` ClassifierHandle calls."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision
        net = torchvision.models.resnet50()
        self.fc = net.fc
        net.fc = torch.nn.Identity()
        self.body = net

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.fc(features), features


CASES: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, int, int]]] = {
    "densenet-bc-100": (_densenet_bc_100, (3, 32, 32)),
    "wide-resnet-28-10": (_wide_resnet_28_10, (3, 32, 32)),
    "resnet50-imagenet": (_TorchvisionResNet50, (3, 224, 224)),
}
KINDS = ("forward", "forward_backward")


def measure(case: str, kind: str, batch: int) -> dict:
    """In this process: the estimate, and the peak RSS growth of one pass of ``batch`` images."""
    torch.manual_seed(0)
    build, shape = CASES[case]
    handle = ClassifierHandle(build(), torch.device("cpu"), batch_size=batch)
    available = memory.available_bytes(handle.device)
    # fitted as if memory were unlimited, so the measured pass takes exactly ``batch`` images
    handle.fit_batch_sizes(shape, available=1 << 62)
    per_image = handle.memory["bytes_per_image"][kind]
    images = torch.rand(batch, *shape)

    def one_pass(x: torch.Tensor) -> None:
        if kind == "forward":
            handle.outputs(x)
        else:
            handle.input_gradient(x, lambda logits, features: logits.logsumexp(1))

    one_pass(images[:2])  # library set-up (thread pools, kernel caches) is not the batch's memory
    before = memory.peak_resident_bytes()
    one_pass(images)
    grown = memory.peak_resident_bytes() - before
    estimate = per_image * batch
    return {"case": case, "image_shape": list(shape), "kind": kind, "batch": batch,
            "estimated_bytes_per_image": per_image, "estimated_bytes": estimate, "rss_growth_bytes": grown,
            "growth_over_estimate": grown / estimate,
            "safe": grown <= memory.ALLOCATOR_OVERHEAD * estimate,
            "fitted_batch_on_24_gib": memory.fit_batch_size(1 << 20, per_image, 24 * GIB),
            "available_bytes_now": available}


def measure_in_fresh_process(case: str, kind: str, batch: int) -> dict:
    """``measure`` in a new interpreter, so the peak resident set starts from nothing of ours."""
    done = subprocess.run([sys.executable, __file__, "--one", case, kind, str(batch)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--batch", type=int, default=64, help="images in the measured pass")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--one", nargs=3, metavar=("CASE", "KIND", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        case, kind, batch = args.one
        print(json.dumps(measure(case, kind, int(batch))))
        return
    rows = [measure_in_fresh_process(case, kind, args.batch)
            for case in args.cases.split(",") for kind in args.kinds.split(",")]
    for r in rows:
        print(f"{r['case']:>18} {r['kind']:>16} batch {r['batch']:>4}: estimate "
              f"{r['estimated_bytes_per_image'] / 2**20:7.2f} MiB/image, {r['estimated_bytes'] / GIB:6.2f} GiB; "
              f"RSS grew {r['rss_growth_bytes'] / GIB:6.2f} GiB ({r['growth_over_estimate']:.2f}x); "
              f"fits {r['fitted_batch_on_24_gib']} on 24 GiB")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
