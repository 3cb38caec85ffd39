"""Network passes of a run against the minimum it needs, and the cost of ODIN's grid search.

Runs a benchmark with the cache disabled (``--fresh-cache``: empty) so that every pass is
spent and counted, and reports per seed, through ``oodbench.passes``: forward and
forward+backward image passes of the shared extraction, the attacks and each detector,
against this minimum:

* extraction: one forward per image of every set the run extracts (train, val, test, each
  OOD set, each adversarial set), sizes read by loading the sets through their plugins;
* attacks, by definition: FGSM one forward+backward per attacked image, BIM and PGD
  ``steps`` of them, BIM with ``schedule = "kurakin"`` ``kurakin_steps(eps)``
  (``oodbench_plugins.attacks.gradient_sign``);
* detectors that read only shared outputs (no ``"gradients"`` in ``needs``): nothing;
* gradient detectors: their documented cost with every avoidable pass removed (``MINIMA``).
  Where a grid includes eps = 0, that point needs no pass of its own: x~ = x, whose outputs
  come out of the forward half of the forward+backward pass at x that the grid spends
  anyway. A score with the chosen eps = 0 is read off the shared outputs. A non-tuned
  detector's score is needed once per image of every set a source draws from (held-out
  images included: the test set is shared by all sources, each holding out other images);
  a source-tuned detector's once per evaluated image of each source, with that source's
  (T, eps). The forward+backward unit also hides one possible saving: ODIN's logits at x do
  not depend on T, so |T| gradients could share one forward; counted here as |T| passes.

A gradient detector the script has no formula for is reported with an unknown minimum.

    python benchmarks/passes_report.py --benchmark digits --detectors msp,gmm,mahalanobis,odin --out passes.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from oodbench.api import DatasetContext, ImageSet
from oodbench.benchmark import Benchmark, load_benchmark
from oodbench.cli import parse_detectors
from oodbench.passes import core_minimum, passes_report
from oodbench.plugins import Registry, build_registry, instantiate, resolve_options
from oodbench.runner import RunOptions, RunResult, choose_device, image_requests, run_benchmark, source_plugins
from oodbench_plugins.attacks.gradient_sign import kurakin_steps

Counts = dict[str, int]


def counts(forward: int = 0, forward_backward: int = 0) -> Counts:
    return {"forward": int(forward), "forward_backward": int(forward_backward)}


# -- image sets -------------------------------------------------------------------------
def image_set_sizes(bench: Benchmark, registry: Registry, seed: int, data_dir: Path) -> dict[str, int]:
    """Images in every set a run of ``bench`` extracts, named as its ``extract:`` activities.

    Loaded through the dataset plugins (as the runner loads them), not read back from the
    pass counts, so the extraction minimum is an independent figure.
    """
    ref = bench.in_distribution
    dataset = instantiate(registry.get("datasets", ref.plugin), ref.options, seed=seed)
    splits: dict[str, ImageSet] = {s: dataset.load(DatasetContext(split=s, seed=seed, data_dir=data_dir))
                                   for s in ("train", "val", "test")}
    if bench.test_subset:
        splits["test"] = splits["test"].subset(np.arange(min(bench.test_subset, len(splits["test"]))))
    test = splits["test"]
    sizes = {name: len(images) for name, images in splits.items()}
    attacked = min(bench.attack_subset or len(test), len(test))
    # The image sets the failure-source plugins ask for, under the names the runner extracts them by.
    for name, request in image_requests(source_plugins(registry, bench, seed)).items():
        if request.attack is not None:
            sizes[name] = attacked
            continue
        source = instantiate(registry.get("datasets", request.dataset), request.options, seed=seed)
        ctx = DatasetContext(split="test", seed=seed, data_dir=data_dir, image_shape=test.image_shape,
                             size=len(test), in_distribution=splits.__getitem__)
        sizes[name] = len(source.load(ctx))
    return sizes


def scored_sets(seed_meta: dict[str, Any], uses: dict[str, tuple[str, ...]]) -> set[str]:
    """The sets the run's sources draw positives and negatives from (``uses``: each source's ``Case.uses``;
    ``mistakes`` uses only the test set, ``ood:x`` the test set and ``ood:x``)."""
    return {name for source in seed_meta["sources"] for name in uses[source]}


# -- attacks ------------------------------------------------------------------------------
#: forward+backward passes per attacked image, from the attack's resolved options and eps (BIM's "kurakin"
#: schedule takes its number of steps from eps)
ATTACK_STEPS: dict[str, Callable[[dict[str, Any], float], int]] = {
    "fgsm": lambda options, eps: 1,
    "bim": lambda options, eps: kurakin_steps(eps) if options["schedule"] == "kurakin" else options["steps"],
    "pgd": lambda options, eps: options["steps"],
}


def attack_minimum(bench: Benchmark, registry: Registry, sizes: dict[str, int]) -> dict[str, Counts]:
    out = {}
    for attack in bench.attacks:
        if attack.plugin not in ATTACK_STEPS:
            continue  # unknown attack: its minimum stays unknown
        options = resolve_options(registry.get("attacks", attack.plugin), attack.options)
        for eps in attack.eps:
            steps = ATTACK_STEPS[attack.plugin](options, eps)
            out[f"attack:{attack.plugin}:{eps:g}"] = counts(forward_backward=steps * sizes[f"adv:{attack.plugin}:{eps:g}"])
    return out


# -- gradient detectors -------------------------------------------------------------------
class DetectorRun:
    """What one detector of one seed did: its label, resolved options, metadata and result rows."""

    def __init__(self, label: str, options: dict[str, Any], seed_meta: dict[str, Any], rows: list[dict[str, Any]],
                 sizes: dict[str, int], uses: dict[str, tuple[str, ...]]):
        self.label, self.options, self.seed_meta, self.rows, self.sizes = label, options, seed_meta, rows, sizes
        self.uses = uses

    @property
    def metadata(self) -> dict[str, Any]:
        return self.seed_meta["detectors"].get(self.label, {})

    def scored_images(self) -> int:
        return sum(self.sizes[name] for name in scored_sets(self.seed_meta, self.uses))

    def activity(self, phase: str) -> str:
        return f"detector:{self.label}:{phase}"


def _grid(temperatures, epsilons) -> tuple[int, int]:
    """(|T|, number of eps > 0): the grid points that need a pass of their own."""
    return len(set(temperatures)), sum(1 for e in set(epsilons) if e > 0)


def _preprocessed_score(run: DetectorRun, epsilon: float) -> Counts:
    """One gradient at x and one forward at x~ per scored image; none when eps = 0."""
    n = run.scored_images() if epsilon > 0 else 0
    return counts(n, n)


def odin_minimum(run: DetectorRun) -> dict[str, Counts]:
    """``odin``: per holdout image |T| forward+backward, and |eps > 0| forwards per distinct (image, gradient
    sign) pair over the temperatures (``grid_directions``, reported per row: an image whose sign at T is the one
    it had at a smaller T needs no new forward); per evaluated image, 1 + 1. The eps = 0 forwards are not in
    the minimum: those logits are the extraction's.
    """
    temperatures, moving = _grid(run.options["temperatures"], run.options["epsilons"])
    tuned = [row for row in run.rows if row["tuned_params"]]
    holdout = sum(run.seed_meta["sources"][row["source"]]["n_holdout"] for row in tuned)
    directions = sum(json.loads(row["tuned_params"])["grid_directions"] for row in tuned)
    scored = 0
    for row in tuned:
        if json.loads(row["tuned_params"])["epsilon"] > 0:
            source = run.seed_meta["sources"][row["source"]]
            scored += source["n_pos"] + source["n_neg"]
    return {run.activity("tune"): counts(moving * directions, temperatures * holdout),
            run.activity("score"): counts(scored, scored)}


def odin_nood_minimum(run: DetectorRun) -> dict[str, Counts]:
    """``odin-nood``: per val image, 1 gradient for FGSM, then the grid on the clean and the FGSM image."""
    temperatures, moving = _grid(run.options["temperatures"], run.options["epsilons"])
    val = run.sizes["val"]
    return {run.activity("fit"): counts(moving * run.metadata["grid_directions"], val + 2 * val * temperatures),
            run.activity("score"): _preprocessed_score(run, run.metadata["epsilon"])}


def mahalanobis_pre_minimum(run: DetectorRun) -> dict[str, Counts]:
    """``mahalanobis-pre``: per val image, FGSM and a direction on both images, then a forward per eps > 0."""
    epsilons = set(run.options["epsilons"])
    val = run.sizes["val"] if len(epsilons) > 1 else 0  # one eps: fixed, no search
    moving = sum(1 for e in epsilons if e > 0)
    return {run.activity("fit"): counts(2 * val * moving, 3 * val),
            run.activity("score"): _preprocessed_score(run, run.metadata["epsilon"])}


#: minimum passes of the gradient detectors whose cost is documented, by registered name
MINIMA: dict[str, Callable[[DetectorRun], dict[str, Counts]]] = {
    "odin": odin_minimum,
    "odin-nood": odin_nood_minimum,
    "mahalanobis-pre": mahalanobis_pre_minimum,
}


def detector_minimum(registry: Registry, name: str, run: DetectorRun) -> dict[str, Counts]:
    if name in MINIMA:
        return MINIMA[name](run)
    if "gradients" not in registry.get("detectors", name).target.needs:
        return {run.activity(phase): counts() for phase in ("fit", "tune", "score")}
    return {}  # a gradient detector without a documented formula: unknown


# -- the report ---------------------------------------------------------------------------
def run_minimum(result: RunResult, bench: Benchmark, registry: Registry, data_dir: Path,
                seed_meta: dict[str, Any]) -> tuple[dict[str, Counts], dict[str, int]]:
    """(minimum passes per activity, image set sizes) of one seed of ``result``."""
    seed = seed_meta["seed"]
    sizes = image_set_sizes(bench, registry, seed, data_dir)
    minimum = {**core_minimum(sizes), **attack_minimum(bench, registry, sizes)}
    uses = {case.name: case.uses for plugin in source_plugins(registry, bench, seed) for case in plugin.cases()}
    for spec in result.meta["detectors"]:
        options = resolve_options(registry.get("detectors", spec["name"]), spec["options"])
        rows = [r for r in result.rows if r["seed"] == seed and r["detector"] == spec["label"]]
        minimum.update(detector_minimum(registry, spec["name"], DetectorRun(spec["label"], options, seed_meta, rows, sizes,
                                                                         uses)))
    return minimum, sizes


def odin_grid_cost(result: RunResult, registry: Registry, seed_meta: dict[str, Any]) -> dict[str, Any]:
    """Measured tuning passes per holdout image of every ``odin`` detector, against the grid's naive cost.

    Naive: every grid point reruns the detector, one forward+backward and one forward per image
    (what a generic grid search over ODIN's ``predict`` does, e.g. pytorch-ood's ``GridSearch``).
    """
    out = {}
    for spec in result.meta["detectors"]:
        if spec["name"] != "odin":
            continue
        options = resolve_options(registry.get("detectors", "odin"), spec["options"])
        tuned = [r for r in result.rows if r["seed"] == seed_meta["seed"] and r["detector"] == spec["label"] and r["tuned_params"]]
        holdout = sum(seed_meta["sources"][r["source"]]["n_holdout"] for r in tuned)
        directions = sum(json.loads(r["tuned_params"])["grid_directions"] for r in tuned)
        measured = seed_meta["passes"].get(f"detector:{spec['label']}:tune", counts())
        temperatures, epsilons = len(set(options["temperatures"])), len(set(options["epsilons"]))
        points = temperatures * epsilons
        moving = sum(1 for e in set(options["epsilons"]) if e > 0)
        still = 1 if 0 in set(options["epsilons"]) else 0
        out[spec["label"]] = {
            "holdout_images": holdout,
            "grid": {"temperatures": temperatures, "epsilons": epsilons},
            "directions_per_image": directions / holdout if holdout else None,
            "measured_per_image": {k: v / holdout for k, v in measured.items()} if holdout else None,
            "formula_per_image": {"forward": still + moving * directions / holdout if holdout else 0.0,
                                  "forward_backward": float(temperatures)},
            "naive_per_image": counts(points, points),
        }
    return out


def throughput(seed_meta: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Images/s through the network by phase (feature extraction, attacks, detectors' own passes).

    ``network_share``: the part of the phase's wall time spent inside network passes; the rest
    is data handling and bookkeeping (MEASUREMENTS.md's plain-PyTorch figures have none).
    """
    phases: dict[str, dict[str, float]] = {}
    for activity, entry in seed_meta["throughput"].items():
        phase = phases.setdefault(activity.split(":")[0], {"images": 0, "network_seconds": 0.0, "wall_seconds": 0.0})
        for key in phase:
            phase[key] += entry[key]
    for phase in phases.values():
        wall = phase["wall_seconds"]
        phase["images_per_second"] = phase["images"] / wall if wall else 0.0
        phase["network_share"] = phase["network_seconds"] / wall if wall else 0.0
    return phases


def report(result: RunResult, bench: Benchmark, registry: Registry, data_dir: Path) -> list[dict[str, Any]]:
    """Per seed: image set sizes, the passes report against the minimum, ODIN's grid cost, throughput."""
    out = []
    for seed_meta in result.meta["per_seed"]:
        minimum, sizes = run_minimum(result, bench, registry, data_dir, seed_meta)
        out.append({"seed": seed_meta["seed"], "image_sets": sizes,
                    "passes": passes_report(seed_meta["passes"], minimum),
                    "odin_grid": odin_grid_cost(result, registry, seed_meta),
                    "throughput": throughput(seed_meta), "numerics": seed_meta["numerics"]["used"]})
    return out


def _print(reports: list[dict[str, Any]]) -> None:
    for seed_report in reports:
        print(f"seed {seed_report['seed']}: image passes, measured / minimum (forward; forward+backward)")
        passes = seed_report["passes"]
        for name, entry in [*passes["groups"].items(), ("total", passes["total"])]:
            least = entry["minimum"] or {}
            cells = [f"{entry['measured'][k]:>9} / {least.get(k, '?'):>9}" for k in ("forward", "forward_backward")]
            print(f"  {name:<40} {cells[0]};  {cells[1]}")
        for label, grid in seed_report["odin_grid"].items():
            print(f"  {label} grid per holdout image: measured {grid['measured_per_image']}, "
                  f"formula {grid['formula_per_image']}, naive {grid['naive_per_image']}")
        print(f"  throughput ({seed_report['numerics']}): images/s, share of wall time inside network passes")
        for phase, entry in seed_report["throughput"].items():
            print(f"  {phase:<40} {entry['images_per_second']:>9.0f} img/s  {entry['network_share']:.0%} "
                  f"({entry['images']} images, {entry['wall_seconds']:.1f} s)")


def run_arguments(description: str, detectors: str) -> argparse.ArgumentParser:
    """The options every benchmark script that runs oodbench takes (this one and end_to_end.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--benchmark", default="digits", help="registered benchmark name or TOML file")
    parser.add_argument("--detectors", default=detectors)
    parser.add_argument("--data-dir", type=lambda text: Path(text).expanduser(), default=Path("."))
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on a GPU (as oodbench run --bf16)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last on a GPU")
    parser.add_argument("--out", help="write the result as JSON here")
    return parser


def benchmark_named(registry: Registry, name: str) -> Benchmark:
    """A registered benchmark, or the TOML file ``name`` when it ends in .toml."""
    return load_benchmark(Path(name) if name.endswith(".toml") else registry.get("benchmarks", name).target)


def main(argv: list[str] | None = None) -> int:
    parser = run_arguments(__doc__.splitlines()[0], "msp,gmm,mahalanobis,odin")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--fresh-cache", action="store_true",
                        help="run with an empty temporary cache, as a first `oodbench run` does (default: cache "
                             "disabled, as `oodbench run --no-cache`)")
    args = parser.parse_args(argv)
    registry = build_registry(strict=True)
    bench = benchmark_named(registry, args.benchmark)
    data_dir = args.data_dir
    with tempfile.TemporaryDirectory(prefix="oodbench-passes-") as fresh:
        opts = RunOptions(benchmark=bench, detectors=parse_detectors(args.detectors), seeds=list(range(args.seeds)),
                          cache_dir=Path(fresh) if args.fresh_cache else None, data_dir=data_dir,
                          device=choose_device(args.device), progress=False, bf16=args.bf16,
                          channels_last=args.channels_last)
        result = run_benchmark(opts, registry)
    reports = report(result, bench, registry, data_dir)
    _print(reports)
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": bench.name, "detectors": args.detectors,
                                              "cache": "fresh" if args.fresh_cache else "disabled",
                                              "torch_threads": torch.get_num_threads(),
                                              "wall_seconds": result.meta["wall_seconds"], "per_seed": reports},
                                             indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
