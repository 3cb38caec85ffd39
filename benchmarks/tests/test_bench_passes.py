"""Network passes against the run's minimum, and the cost of ODIN's grid (issue #9, "Performance").

A small digits run (one OOD set, FGSM and BIM at one eps; cache disabled so every pass is
spent and counted) with msp, gmm, mahalanobis and odin. The minimum is the one
``benchmarks/passes_report.py`` documents: one forward per image of every extracted set, the
attacks' passes by definition, and ODIN's grid with the eps = 0 forwards removed.
"""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from oodbench.benchmark import load_benchmark
from oodbench.cli import parse_detectors
from oodbench.passes import KINDS
from oodbench.runner import RunOptions, run_benchmark
from oodbench_plugins.detectors.odin import PAPER_EPSILONS, PAPER_TEMPERATURES

import passes_report  # a script of benchmarks/ (on sys.path from conftest)

FEATURE_ONLY = ("msp", "gmm", "mahalanobis")


def small_digits(registry):
    bench = load_benchmark(registry.get("benchmarks", "digits").target)
    return replace(bench, ood=bench.ood[:1], attacks=tuple(replace(a, eps=a.eps[1:2]) for a in bench.attacks))


def run(registry, bench, detectors: str):
    opts = RunOptions(benchmark=bench, detectors=parse_detectors(detectors), seeds=[0], cache_dir=None,
                      data_dir=Path("."), device=torch.device("cpu"), progress=False)
    return run_benchmark(opts, registry)


def extraction(result) -> dict:
    return {a: c for a, c in result.meta["per_seed"][0]["passes"].items() if a.startswith("extract:")}


@pytest.fixture(scope="module")
def core_four(registry):
    bench = small_digits(registry)
    result = run(registry, bench, ",".join(FEATURE_ONLY) + ",odin")
    assert all(row["status"] == "ok" for row in result.rows), [r["error"] for r in result.rows if r["status"] != "ok"]
    return bench, result, passes_report.report(result, bench, registry, Path("."))[0]


def test_total_passes_are_within_1_2x_of_the_minimum(core_four):
    _, _, report = core_four
    total = report["passes"]["total"]
    assert total["minimum"] is not None, "every activity has a stated minimum"
    for kind in KINDS:
        assert total["minimum"][kind] <= total["measured"][kind] <= 1.2 * total["minimum"][kind], kind


def test_shared_extraction_is_one_forward_per_image_of_each_set(core_four):
    _, result, report = core_four
    sizes = report["image_sets"]
    assert {"train", "val", "test", "ood:gaussian", "adv:fgsm:0.1", "adv:bim:0.1", "shift:contrast-3"} == set(sizes)
    assert extraction(result) == {f"extract:{name}": {"forward": n, "forward_backward": 0} for name, n in sizes.items()}
    assert report["passes"]["groups"]["extraction"]["ratio"] == {"forward": 1.0, "forward_backward": None}


def test_feature_only_detectors_add_no_pass(registry, core_four):
    bench, result, report = core_four
    assert extraction(run(registry, bench, "gmm")) == extraction(result)
    for label in FEATURE_ONLY:
        assert report["passes"]["groups"][f"detector:{label}"]["measured"] == {"forward": 0, "forward_backward": 0}


def test_attacks_spend_exactly_their_definition(core_four):
    _, result, report = core_four
    attacked = report["image_sets"]["adv:fgsm:0.1"]
    passes = result.meta["per_seed"][0]["passes"]
    assert passes["attack:fgsm:0.1"] == {"forward": 0, "forward_backward": attacked}
    assert passes["attack:bim:0.1"] == {"forward": 0, "forward_backward": 10 * attacked}  # BIM's default 10 steps
    assert report["passes"]["groups"]["attacks"]["ratio"] == {"forward": None, "forward_backward": 1.0}


def test_odin_grid_costs_one_gradient_per_temperature_and_one_forward_per_grid_point(core_four):
    _, result, report = core_four
    seed = result.meta["per_seed"][0]
    holdout = sum(source["n_holdout"] for source in seed["sources"].values())
    temperatures, epsilons = len(PAPER_TEMPERATURES), len(PAPER_EPSILONS)
    assert (temperatures, epsilons) == (10, 21)
    assert holdout > 0
    # One forward per image at eps = 0, then 20 per distinct (image, gradient sign) pair over the temperatures.
    directions = sum(json.loads(r["tuned_params"])["grid_directions"] for r in result.rows if r["detector"] == "odin")
    assert holdout < directions < 10 * holdout, "signs repeat across temperatures, but not all of them"
    assert seed["passes"]["detector:odin:tune"] == {"forward": holdout + 20 * directions, "forward_backward": 10 * holdout}
    grid = report["odin_grid"]["odin"]
    assert grid["measured_per_image"] == {"forward": 1 + 20 * directions / holdout, "forward_backward": 10.0}
    assert grid["measured_per_image"]["forward"] < 210 and grid["formula_per_image"] == grid["measured_per_image"]
    assert grid["naive_per_image"] == {"forward": 210, "forward_backward": 210}
    # the eps = 0 forwards are the only excess over the minimum (those logits are the extraction's)
    tune = report["passes"]["activities"]["detector:odin:tune"]
    assert tune["minimum"] == {"forward": 20 * directions, "forward_backward": 10 * holdout}


def test_throughput_by_phase_adds_up_to_the_passes(core_four):
    _, result, report = core_four
    passes = result.meta["per_seed"][0]["passes"]
    phases = report["throughput"]
    assert set(phases) == {"extract", "attack", "detector", "fit-batch-size"}
    for phase, entry in phases.items():
        images = sum(c["forward"] + c["forward_backward"] for a, c in passes.items() if a.split(":")[0] == phase)
        assert entry["images"] == images > 0
        assert 0 < entry["network_share"] <= 1
        assert entry["images_per_second"] == pytest.approx(images / entry["wall_seconds"])
    assert report["numerics"] == "fp32"


def test_attack_minimum_follows_bims_schedule(registry):
    """BIM's "kurakin" schedule (the paper benchmarks') spends min(255 eps + 4, 1.25 * 255 eps) steps, floored;
    "fixed" (digits) its 10 steps at every eps. No run: the minimum comes from the benchmark file alone."""
    for name, bim_steps in (("cifar10", {0.05: 15, 0.1: 29, 0.2: 55}), ("digits", {0.05: 10, 0.1: 10, 0.2: 10})):
        bench = load_benchmark(registry.get("benchmarks", name).target)
        sizes = {f"adv:{a.plugin}:{eps:g}": 7 for a in bench.attacks for eps in a.eps}
        minimum = passes_report.attack_minimum(bench, registry, sizes)
        fgsm = {f"attack:fgsm:{e:g}": {"forward": 0, "forward_backward": 7} for e in bim_steps}
        bim = {f"attack:bim:{e:g}": {"forward": 0, "forward_backward": 7 * n} for e, n in bim_steps.items()}
        assert minimum == {**fgsm, **bim}
