"""The end-to-end benchmark (issue #9): an oodbench run against a plain loop of its minimum passes.

Quick mode: a small digits run (one OOD set, one eps per attack). No pass/fail on time; what
must hold is that the baseline does exactly the minimum passes and the run lands.
"""
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from oodbench import memory
from oodbench.benchmark import load_benchmark

import end_to_end  # a script of benchmarks/ (on sys.path from conftest), not a package


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(12, 3)
        self.forward_images = self.backward_images = 0

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            self.backward_images += len(x)
        else:
            self.forward_images += len(x)
        return self.linear(x.flatten(1))


def test_plain_baseline_does_exactly_the_passes_asked():
    network = Counting()
    seconds = end_to_end.plain_passes(network, (3, 2, 2), forward=1000, forward_backward=130,
                                      batch_sizes={"forward": 64, "forward_backward": 16},
                                      device=torch.device("cpu"))
    assert (network.forward_images, network.backward_images) == (1000, 130)
    assert seconds > 0


def test_quick_end_to_end_run_against_the_baseline(registry, tmp_path):
    bench = load_benchmark(registry.get("benchmarks", "digits").target)
    bench = replace(bench, ood=bench.ood[:1], attacks=tuple(replace(a, eps=a.eps[1:2]) for a in bench.attacks))
    result = end_to_end.measure(bench, registry, "msp,gmm,odin", Path("."), torch.device("cpu"))
    assert result["errors"] == 0 and result["rows"] == 3 * 8  # mistakes, gaussian, FGSM and BIM (flipped, all), shift (both readings)
    least, measured = result["passes_minimum"], result["passes_measured"]
    probe = sum(memory.PROBE_SIZES)  # the batch-size fit's blank images, which no result needs
    assert least["forward_backward"] + probe == measured["forward_backward"] > probe
    assert least["forward"] <= measured["forward"] <= 1.2 * least["forward"]
    assert result["plain_baseline_seconds"] > 0 and math.isfinite(result["ratio"])
    (tmp_path / "e2e.json").write_text(json.dumps(result))
