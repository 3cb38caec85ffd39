"""A paper-scale study on paper: its plan (tasks per kind), GPU-hours, store size and wall time on 1, 8, 64 GPUs.

The study: ``cifar10``, ``cifar10-wrn``, ``cifar100`` and ``cifar100-wrn`` (DenseNet-BC-100 and
WRN-28-10 on CIFAR-10 and CIFAR-100), 5 seeds each, every installed detector with its
defaults, on GPUs (``--device cuda``). Nothing is run and no data is read: the plans come from
``make_plan`` (planning loads nothing; ``torch.device("cuda")`` is only a value there, so this
works on a machine without a GPU), and every cost is a model built from the figures measured
on one H100 in ``../shared/MEASUREMENTS.md`` (copied into ``MEASURED`` below) and the
assumptions in ``ASSUMED``. The JSON repeats both, so each number can be traced.

Cost model, per task (fp32 throughout, the benchmarks' default; ``--bf16`` would cut it):

The plans are made without a store, which groups a seed's work as this cost model prices it:
one ``sources`` task per seed (classifier, outputs, attacks; the store's plan splits it into
``classifier``, ``extract`` and ``attack`` tasks) and one ``detector`` task per detector and
seed (the store's plan splits a detector that stores its fit into ``fit`` and one ``evaluate``
per source, which can only spread the work further: the wall times below are upper bounds).
Figures in the JSON (``prepare`` = the ``sources`` task) are as published on 2026-12-01.

* ``prepare``: training (DenseNet-BC-100: the measured ~1.7 h for 300 epochs; WRN-28-10:
  epochs x train images / its measured train-step throughput), extraction of every image set
  (the measured 22 s per 170k images, DenseNet; WRN scaled by the inference-throughput
  ratio), FGSM + BIM (the measured 54 s for 330k forward+backward and 60k forward, scaled by
  the passes of the benchmark and, for WRN, by the throughput ratios), plus loading the data
  sets and writing the outputs to the store.
* ``detector`` tasks whose class declares ``"gradients"`` in ``needs`` (ODIN, ODIN-noOOD,
  Mahalanobis with input preprocessing and its feature ensembles): their network passes,
  counted from what each does (the grids and noise levels read from the plugins' own
  defaults) and timed at the measured inference and input-gradient throughputs; their
  CPU-side arithmetic (Mahalanobis distances, logistic regressions) at assumed CPU rates.
* the other detectors read stored outputs: EM fits timed from the measured H100 EM times (a
  task fits on the run's device); the small density networks (MAF, VAE, PixelCNN++ "small")
  from assumed per-step times; the rest in CPU seconds.
* every task of a GPU run asks for a GPU (``plan.py``), so a task holds its GPU for its whole
  duration, CPU parts included: GPU-hours below are GPU-held hours. On more than one worker a
  detector task may land on a worker that did not prepare its seed and first reads the seed's
  outputs and adversarial images back from the store (counted on 8 and 64 GPUs, not on 1,
  where the local executor keeps the prepared seed in memory).

Wall time on G GPUs: GPU-held hours / G, but never below the critical path (a seed's prepare
task, then its longest detector task); a greedy list schedule of the same tasks (ready prepare
tasks first, then the longest detector tasks) is given beside that bound.

    python benchmarks/paper_scale_plan.py --out benchmarks/results/paper-scale-plan.json
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from oodbench.benchmark import Benchmark, load_benchmark
from oodbench.cli import parse_detectors
from oodbench.plan import make_plan, summary
from oodbench.plugins import Registry, build_registry, resolve_options
from oodbench.runner import RunOptions
from oodbench.tasks import Job

BENCHMARKS = ("cifar10", "cifar10-wrn", "cifar100", "cifar100-wrn")
SEEDS = 5
GPUS = (1, 8, 64)
GB = 1e9

#: ../shared/MEASUREMENTS.md, "Classifier throughput on one H100" (fp32, images/s, 32x32) and the phase table
#: below it (plain PyTorch script, DenseNet-BC-100, random weights, fp32), EM on one H100 and on 2 CPU cores.
MEASURED: dict[str, Any] = {
    "throughput_h100_fp32": {
        "densenet-bc": {"forward": 18_000, "forward_backward": 6_800, "train_step": 2_400},
        "wide-resnet": {"forward": 15_700, "forward_backward": 7_200, "train_step": 4_400},
    },
    "phases_densenet_fp32_s": {
        "features_170k_images": 22.0,
        "fgsm_bim_330k_fwd_bwd_60k_fwd": 54.0,
        "odin_grid_90k_fwd_bwd_1.9M_fwd": 116.0,
        "odin_final_175k_fwd_bwd_175k_fwd": 42.0,
    },
    "training_densenet_300_epochs_fp32_s": 1.7 * 3600,
    "em_h100_n50k_d342_20_iterations_s": {"100": 0.059, "1000": 0.106},
    "em_cpu_2_cores_n50k_d342_s": {"100": {"iterations": 20, "seconds": 3.12},
                                   "1000": {"iterations": 10, "seconds": 14.1}},
}

#: Everything the measurements do not give, stated.
ASSUMED: dict[str, Any] = {
    "ood_set_sizes": {"svhn": 26_032, "tiny-imagenet-crop": 10_000, "tiny-imagenet-resize": 10_000,
                      "lsun-crop": 10_000, "lsun-resize": 10_000, "isun": 8_925, "fashion-mnist": 10_000,
                      "gaussian": "as many as the test set", "uniform": "as many as the test set"},
    "id_files": {"cifar10": {"train_file": 50_000, "test": 10_000},
                 "cifar100": {"train_file": 50_000, "test": 10_000}},
    "test_error_for_the_mistakes_source": {  # published figures (Huang et al. 2017; Zagoruyko & Komodakis 2016)
        "densenet-bc": {"cifar10": 0.0451, "cifar100": 0.2227},
        "wide-resnet": {"cifar10": 0.0389, "cifar100": 0.1885}},
    "adversarial_flipped_fraction": 1.0,  # upper bound: every attacked image flips the prediction
    "odin_forwards_per_holdout_image": "the grid's worst case, 1 + |T| * |eps > 0| (201 for the paper grid)",
    "tuned_eps_is_nonzero": True,  # worst case: the chosen eps needs a gradient and a forward per scored image
    "ensemble_memo": "not counted: every source perturbs its own images (an upper bound; the detector memoises "
                     "test images shared by sources, which can save up to about half)",
    "layers_forward_backward": "a full forward+backward per layer and image (an upper bound for early layers)",
    "em_iterations": "max_iter (100): an upper bound, EM usually stops earlier at tol",
    "em_scaling": "time per iteration linear in N and D, interpolated linearly in K between the measured K",
    "kmeans_init_in_em_iterations": 20,
    "em_iteration_floor_s": 0.001,  # a tiny per-class mixture (zheng) still launches its kernels
    "maf_step_s": 0.003,  # float64 Adam step of the 5-layer MADE flow at batch 128, launch-bound (not measured)
    "vae_step_s": 0.002,  # float64 Adam step of the 512-128 VAE at batch 128, launch-bound (not measured)
    "density_net_scoring_s": 2.0,
    "pixelcnn_small": "costs like DenseNet-BC-100 per image (train step and forward): both are small-channel, "
                      "memory-bound conv nets; its forward FLOPs are 0.24x DenseNet's, so this is pessimistic",
    "cpu_blas_gflops": 50.0,  # a GPU node's CPU, float64 matmuls (covariances, whitening)
    "cpu_einsum_gflops": 2.0,  # numpy's einsum distances (not BLAS)
    "logistic_regression_cv_s": 1.0,  # one LogisticRegressionCV (10 Cs x 5 folds) on ~1,000 rows x 4 layers
    "small_cpu_detector_s": {"msp": 1.0, "logits": 1.0, "temperature": 2.0},
    "dataset_loading_s": 20.0,  # decoding CIFAR, SVHN's .mat and ODIN's image folders into memory
    "store_read_gb_per_s": 1.0,
    "store_write_gb_per_s": 1.0,
    "task_start_s": 5.0,  # a worker's imports and the registry, per task
    "bytes": {"outputs": "float32", "adversarial_images": "float32 3x32x32", "weights": "float32 state_dict",
              "scores": "float64 per scored image", "format": "uncompressed .npz",
              "not_counted": "fitted detector states (MBs each), task records, the data sets themselves"},
}


# -- the benchmark's image sets and sources ------------------------------------------------
class Setting:
    """One benchmark's numbers: image sets, sources with their holdouts, network dimensions and pass rates."""

    def __init__(self, bench: Benchmark, registry: Registry):
        self.bench = bench
        self.model = bench.model.plugin
        self.dataset = bench.in_distribution.plugin
        model_options = resolve_options(registry.get("models", self.model), bench.model.options)
        data_options = resolve_options(registry.get("datasets", self.dataset), bench.in_distribution.options)
        files = ASSUMED["id_files"][self.dataset]
        test = files["test"]
        self.sets: dict[str, int] = {"train": files["train_file"] - data_options["val_size"],
                                     "val": data_options["val_size"], "test": test}
        for ref in bench.ood:
            size = ASSUMED["ood_set_sizes"][ref.dataset]
            self.sets[f"ood:{ref.name}"] = test if isinstance(size, str) else size
        attacked = min(bench.attack_subset or test, test)
        self.steps = {}
        for ref in bench.attacks:
            options = resolve_options(registry.get("attacks", ref.plugin), ref.options)
            attack = registry.get("attacks", ref.plugin).target(**options)
            for eps in ref.eps:
                self.sets[f"adv:{ref.plugin}:{eps:g}"] = attacked
                # BIM's Kurakin schedule sets its steps from eps (gradient_sign.BIM.schedule_for)
                steps = attack.schedule_for(eps)[0] if hasattr(attack, "schedule_for") else options.get("steps", 1)
                self.steps[f"adv:{ref.plugin}:{eps:g}"] = steps
        network = registry.get("models", self.model).target(**model_options).build(
            (3, 32, 32), 100 if self.dataset == "cifar100" else 10, seed=0)
        self.classes = 100 if self.dataset == "cifar100" else 10
        with torch.no_grad():
            _, features, maps = network.forward_layers(torch.zeros(1, 3, 32, 32))
        self.feature_dim = features.shape[1]
        self.layer_dims = [m.shape[1] for m in maps]
        self.state_bytes = 4 * sum(v.numel() for v in network.state_dict().values())
        self.epochs = model_options["epochs"]
        self.rates = MEASURED["throughput_h100_fp32"][self.model]
        self.sources = self._sources(attacked)

    def _sources(self, attacked: int) -> list[dict[str, int]]:
        bench, test = self.bench, self.sets["test"]
        error = ASSUMED["test_error_for_the_mistakes_source"][self.model][self.dataset]
        sides = []
        if bench.mistakes:
            wrong = round(error * test)
            sides.append(("mistakes", test - wrong, wrong))
        sides += [(name, test, n) for name, n in self.sets.items() if name.startswith("ood:")]
        for name in (n for n in self.sets if n.startswith("adv:")):
            flipped = round(ASSUMED["adversarial_flipped_fraction"] * attacked)
            sides += [(f"{name}:flipped", attacked, flipped), (f"{name}:all", attacked, attacked)]
        out = []
        for name, pos, neg in sides:
            hold = [min(bench.holdout_size, int(bench.holdout_fraction * n)) for n in (pos, neg)]
            out.append({"name": name, "holdout": sum(hold), "evaluated": pos + neg - sum(hold)})
        return out

    # -- derived numbers --
    @property
    def scored_images(self) -> int:
        """Images a non-tuned detector scores once each: the test set, every OOD set, every adversarial set."""
        return sum(n for name, n in self.sets.items() if name not in ("train", "val"))

    @property
    def extracted_images(self) -> int:
        return sum(self.sets.values())

    def seconds(self, forward: float = 0, forward_backward: float = 0) -> float:
        return forward / self.rates["forward"] + forward_backward / self.rates["forward_backward"]

    def output_bytes(self) -> dict[str, float]:
        per_image = 4 * (self.classes + self.feature_dim + sum(self.layer_dims))
        return {name: n * per_image for name, n in self.sets.items()}

    def adversarial_bytes(self) -> float:
        return sum(n for name, n in self.sets.items() if name.startswith("adv:")) * 3 * 32 * 32 * 4


# -- prepare -----------------------------------------------------------------------------------
def prepare_cost(s: Setting) -> dict[str, float]:
    dense = MEASURED["throughput_h100_fp32"]["densenet-bc"]
    phases = MEASURED["phases_densenet_fp32_s"]
    if s.model == "densenet-bc":
        training = MEASURED["training_densenet_300_epochs_fp32_s"] * s.epochs / 300
    else:
        training = s.epochs * s.sets["train"] / s.rates["train_step"]
    non_adversarial = sum(n for name, n in s.sets.items() if not name.startswith("adv:"))
    extraction = phases["features_170k_images"] * non_adversarial / 170_000 * dense["forward"] / s.rates["forward"]
    adv_fb = sum(s.steps[name] * s.sets[name] for name in s.steps)
    adv_fwd = sum(s.sets[name] for name in s.steps)

    def plain(rates, fwd, fb):
        return fwd / rates["forward"] + fb / rates["forward_backward"]

    attacks = phases["fgsm_bim_330k_fwd_bwd_60k_fwd"] * plain(s.rates, adv_fwd, adv_fb) / plain(dense, 60_000, 330_000)
    written = sum(s.output_bytes().values()) + s.adversarial_bytes() + s.state_bytes
    io = ASSUMED["dataset_loading_s"] + written / GB / ASSUMED["store_write_gb_per_s"] + ASSUMED["task_start_s"]
    return {"training": training, "extraction": extraction, "attacks": attacks, "data_and_store": io,
            "gpu_compute": training + extraction + attacks, "held": training + extraction + attacks + io}


def store_read_seconds(s: Setting) -> float:
    """A detector task on a worker that did not prepare its seed: outputs and adversarial images, and the data sets."""
    read = sum(s.output_bytes().values()) + s.adversarial_bytes()
    return read / GB / ASSUMED["store_read_gb_per_s"] + ASSUMED["dataset_loading_s"]


# -- detectors -----------------------------------------------------------------------------------
def em_seconds(k: int, n: int, d: int, iterations: int) -> float:
    ref = MEASURED["em_h100_n50k_d342_20_iterations_s"]
    low, high = ref["100"] / 20, ref["1000"] / 20  # per iteration at K = 100 and 1000
    per_iteration = low + (high - low) * (k - 100) / 900 if k >= 100 else low * k / 100
    per_iteration = max(per_iteration * n / 50_000 * d / 342, ASSUMED["em_iteration_floor_s"])
    return per_iteration * (iterations + ASSUMED["kmeans_init_in_em_iterations"])


def em_cpu_seconds(k: int, n: int, d: int, iterations: int) -> float:
    """The same fit on 2 CPU cores (MEASUREMENTS' 2-core figures), for comparison only."""
    ref = MEASURED["em_cpu_2_cores_n50k_d342_s"]
    low = ref["100"]["seconds"] / ref["100"]["iterations"]
    high = ref["1000"]["seconds"] / ref["1000"]["iterations"]
    per_iteration = low + (high - low) * (k - 100) / 900 if k >= 100 else low * k / 100
    return per_iteration * n / 50_000 * d / 342 * (iterations + ASSUMED["kmeans_init_in_em_iterations"])


def mahalanobis_cpu(s: Setting, dims: list[int], rows: float) -> float:
    """Tied covariances of the train split per layer and whitening of ``rows`` images (BLAS), then the
    min-distances to every class mean (einsum)."""
    n = s.sets["train"]
    blas = sum(2 * n * d * d + 10 * d ** 3 + 2 * rows * d * d for d in dims) / (ASSUMED["cpu_blas_gflops"] * 1e9)
    einsum = sum(3 * rows * s.classes * d for d in dims) / (ASSUMED["cpu_einsum_gflops"] * 1e9)
    return blas + einsum


def detector_cost(s: Setting, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """GPU seconds (network passes, GPU fits), CPU seconds, and the passes, of one detector task (one seed)."""
    n, d, val, scored = s.sets["train"], s.feature_dim, s.sets["val"], s.scored_images
    layers = len(s.layer_dims)
    fwd = fb = 0.0
    gpu = cpu = 0.0
    note = ""
    if name in ("msp", "logits", "temperature"):
        cpu = ASSUMED["small_cpu_detector_s"][name]
    elif name == "mahalanobis":
        cpu = mahalanobis_cpu(s, [d], scored)
    elif name in ("gmm", "gmm-100", "gmm-1000"):
        gpu = em_seconds(options["k"], n, d, options["max_iter"])
        note = f"EM on 2 CPU cores instead: {em_cpu_seconds(options['k'], n, d, options['max_iter']):.0f} s"
    elif name == "zheng":
        gpu = s.classes * em_seconds(options["k"], n // s.classes, d, options["max_iter"])
    elif name == "waic":
        member = {"k": 100, "max_iter": 100, **(options["member_options"] or {})}
        if options["member"] != "gmm":
            raise ValueError("waic: only the default gmm members have a cost model here")
        gpu = options["M"] * em_seconds(member["k"], n, d, member["max_iter"])
    elif name in ("maf", "vae"):
        steps = options["epochs"] * math.ceil(n / options["batch_size"])
        gpu = steps * ASSUMED[f"{name}_step_s"] + ASSUMED["density_net_scoring_s"]
        note = f"{steps} float64 Adam steps"
    elif name == "pixelcnn":
        from oodbench_plugins.detectors.pixelcnn import CONFIGS

        config = CONFIGS[options["config"]]
        epochs = options["epochs"] or config["epochs"]
        if options["config"] != "small":
            raise ValueError("pixelcnn: only the small config has a cost model here")
        dense = MEASURED["throughput_h100_fp32"]["densenet-bc"]
        gpu = epochs * n / dense["train_step"] + (n + val + scored) / dense["forward"]
        note = f"{epochs} epochs of {n} images, then bits/dim of train and val and a forward per scored image"
    elif name == "odin":
        temperatures = len(set(options["temperatures"]))
        moving = sum(1 for e in set(options["epsilons"]) if e > 0)
        hold = sum(src["holdout"] for src in s.sources)
        evaluated = sum(src["evaluated"] for src in s.sources)
        fb, fwd = temperatures * hold + evaluated, (1 + temperatures * moving) * hold + evaluated
        note = f"grid on {hold} holdout images over {len(s.sources)} sources, then {evaluated} evaluated images"
    elif name == "odin-nood":
        temperatures = len(set(options["temperatures"]))
        moving = sum(1 for e in set(options["epsilons"]) if e > 0)
        fb = val * (1 + 2 * temperatures) + scored
        fwd = val * 2 * (1 + temperatures * moving) + scored
        note = f"grid on {val} clean + {val} FGSM val images, then {scored} scored images"
    elif name == "mahalanobis-pre":
        eps = len(set(options["epsilons"]))
        fb, fwd = 3 * val + scored, 2 * eps * val + scored
        cpu = mahalanobis_cpu(s, [d], 2 * eps * val + scored)
        note = f"eps chosen among {eps} on {val} clean + {val} FGSM val images, then {scored} scored images"
    elif name in ("mahalanobis-ensemble", "mahalanobis-ensemble-nood"):
        eps = len(set(options["epsilons"]))
        moving = sum(1 for e in set(options["epsilons"]) if e > 0)
        if name == "mahalanobis-ensemble":
            hold = sum(src["holdout"] for src in s.sources)
            evaluated = sum(src["evaluated"] for src in s.sources)
            fb = layers * (hold + evaluated)
            fwd = layers * (moving * hold + evaluated)
            regressions = eps * len(s.sources)
            rows = eps * hold + evaluated
            note = (f"{layers} layers x ({moving} noisy eps on {hold} holdout images over {len(s.sources)} "
                    f"sources, then {evaluated} evaluated images); no memo counted")
        else:
            fb = val + layers * (2 * val + scored)
            fwd = val + layers * (moving * 2 * val + scored)
            regressions = eps
            rows = eps * 2 * val + scored
            note = f"FGSM of {val} val images, {layers} layers x {eps} eps on 2 x {val} images, then {scored} scored"
        cpu = mahalanobis_cpu(s, s.layer_dims, rows) + regressions * ASSUMED["logistic_regression_cv_s"]
    else:
        return {"model": None, "gpu_seconds": 0.0, "cpu_seconds": 0.0, "held_seconds": ASSUMED["task_start_s"],
                "passes": {"forward": 0, "forward_backward": 0}, "note": f"NO COST MODEL for '{name}': priced at 0"}
    gpu += s.seconds(fwd, fb)
    return {"model": "gradients" if fb else "stored outputs", "gpu_seconds": gpu, "cpu_seconds": cpu,
            "held_seconds": gpu + cpu + ASSUMED["task_start_s"],
            "passes": {"forward": int(fwd), "forward_backward": int(fb)}, "note": note}


# -- plans and schedules -----------------------------------------------------------------------
def plan_of(name: str, registry: Registry, seeds: int):
    bench = load_benchmark(registry.get("benchmarks", name).target)
    opts = RunOptions(benchmark=bench, detectors=parse_detectors(",".join(registry.names("detectors"))),
                      seeds=list(range(seeds)), cache_dir=None, data_dir=Path("/data"), device=torch.device("cuda"),
                      progress=False)
    return bench, opts, make_plan(Job(opts, registry))


def greedy_schedule(jobs: list[tuple[str, str, float, str | None]], gpus: int) -> float:
    """Makespan of (key, kind, seconds, dependency key) on ``gpus`` GPUs: ready prepare tasks first, then longest."""
    waiting = {key: dep for key, _, _, dep in jobs}
    length = {key: seconds for key, _, seconds, _ in jobs}
    kind = {key: k for key, k, _, _ in jobs}
    done: set[str] = set()
    ready = [(0 if kind[k] == "prepare" else 1, -length[k], k) for k, dep in waiting.items() if dep is None]
    heapq.heapify(ready)
    running: list[tuple[float, str]] = []
    now, free = 0.0, gpus
    blocked = {k: dep for k, dep in waiting.items() if dep is not None}
    while ready or running:
        while free and ready:
            _, _, key = heapq.heappop(ready)
            heapq.heappush(running, (now + length[key], key))
            free -= 1
        now, key = heapq.heappop(running)
        free += 1
        done.add(key)
        for other, dep in list(blocked.items()):
            if dep in done:
                del blocked[other]
                heapq.heappush(ready, (1, -length[other], other))
    return now


def study(registry: Registry, benchmarks: tuple[str, ...], seeds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmarks": {}, "assumptions": ASSUMED, "measured": MEASURED, "seeds": seeds}
    jobs_single, jobs_many = [], []
    for name in benchmarks:
        bench, opts, tasks = plan_of(name, registry, seeds)
        s = Setting(bench, registry)
        prepare = prepare_cost(s)
        read = store_read_seconds(s)
        detectors = {}
        for spec in opts.detectors:
            options = resolve_options(registry.get("detectors", spec.name), spec.options, seed=0)
            cost = detector_cost(s, spec.name, options)
            cost["gradients"] = "gradients" in registry.get("detectors", spec.name).target.needs
            detectors[spec.label] = cost
        per_kind = {"prepare": {"tasks": 0, "gpu_hours": 0.0, "held_hours": 0.0},
                    "detector (gradients)": {"tasks": 0, "gpu_hours": 0.0, "held_hours": 0.0},
                    "detector (stored outputs)": {"tasks": 0, "gpu_hours": 0.0, "held_hours": 0.0}}
        for task in tasks:
            if task.kind == "sources":
                row, gpu, held = per_kind["prepare"], prepare["gpu_compute"], prepare["held"]
                jobs_single.append((f"{name}:{task.key}", "prepare", held, None))
                jobs_many.append((f"{name}:{task.key}", "prepare", held, None))
            else:
                cost = detectors[task.detector]
                row = per_kind["detector (gradients)" if cost["gradients"] else "detector (stored outputs)"]
                gpu, held = cost["gpu_seconds"], cost["held_seconds"]
                jobs_single.append((f"{name}:{task.key}", "detector", held, f"{name}:{task.deps[0]}"))
                jobs_many.append((f"{name}:{task.key}", "detector", held + read, f"{name}:{task.deps[0]}"))
            row["tasks"] += 1
            row["gpu_hours"] += gpu / 3600
            row["held_hours"] += held / 3600
        longest = max(detectors.items(), key=lambda item: item[1]["held_seconds"])
        outputs = s.output_bytes()
        tuned = [label for label, spec in zip(detectors, opts.detectors)
                 if registry.get("detectors", spec.name).target.tunes_on_source]
        score_bytes = 8 * ((len(detectors) - len(tuned)) * s.scored_images
                           + len(tuned) * sum(src["evaluated"] for src in s.sources))
        per_seed_store = {"outputs (logits, features, layers)": sum(outputs.values()),
                          "adversarial images": s.adversarial_bytes(), "weights": s.state_bytes, "scores": score_bytes}
        out["benchmarks"][name] = {
            "model": s.model, "dataset": s.dataset, "tasks_per_kind": summary(tasks), "tasks": len(tasks),
            "image_sets": s.sets, "sources": len(s.sources), "scored_images": s.scored_images,
            "feature_dim": s.feature_dim, "layer_dims": s.layer_dims, "classes": s.classes,
            "prepare_seconds": prepare, "detector_seconds_per_seed": detectors,
            "store_read_seconds_per_detector_task_elsewhere": read,
            "per_kind": per_kind,
            "critical_path_seconds": prepare["held"] + longest[1]["held_seconds"],
            "critical_path_seconds_on_many_gpus": prepare["held"] + longest[1]["held_seconds"] + read,
            "longest_detector": longest[0],
            "unpriced_detectors": [label for label, c in detectors.items() if c["model"] is None],
            "store_bytes_per_seed": per_seed_store, "store_bytes": seeds * sum(per_seed_store.values()),
        }
    runs = out["benchmarks"].values()
    total_single = sum(seconds for _, _, seconds, _ in jobs_single)
    total_many = sum(seconds for _, _, seconds, _ in jobs_many)
    critical = {1: max(r["critical_path_seconds"] for r in runs),
                **{g: max(r["critical_path_seconds_on_many_gpus"] for r in runs) for g in GPUS if g > 1}}
    out["totals"] = {
        "tasks_per_kind": {k: sum(r["tasks_per_kind"].get(k, 0) for r in runs) for k in ("sources", "detector")},
        "gpu_hours_per_kind": {k: sum(r["per_kind"][k]["gpu_hours"] for r in runs) for k in
                               next(iter(runs))["per_kind"]},
        "held_hours_per_kind": {k: sum(r["per_kind"][k]["held_hours"] for r in runs) for k in
                                next(iter(runs))["per_kind"]},
        "held_hours_one_gpu": total_single / 3600,
        "held_hours_many_gpus": total_many / 3600,
        "store_bytes": sum(r["store_bytes"] for r in runs),
    }
    out["wall_hours"] = {}
    for g in GPUS:
        total, jobs = (total_single, jobs_single) if g == 1 else (total_many, jobs_many)
        out["wall_hours"][str(g)] = {"gpu_hours_over_gpus": total / g / 3600, "critical_path": critical[g] / 3600,
                                     "estimate": max(total / g, critical[g]) / 3600,
                                     "bound": "critical path" if critical[g] > total / g else "GPU-hours / GPUs",
                                     "greedy_schedule": greedy_schedule(jobs, g) / 3600}
    out["checks"] = model_checks()
    return out


def model_checks() -> dict[str, Any]:
    """The throughput model against MEASUREMENTS' measured phases (DenseNet fp32): how far pure rates are off."""
    rates = MEASURED["throughput_h100_fp32"]["densenet-bc"]
    phases = MEASURED["phases_densenet_fp32_s"]

    def model(fwd, fb):
        return fwd / rates["forward"] + fb / rates["forward_backward"]

    pairs = {"features_170k_images": model(170_000, 0),
             "fgsm_bim_330k_fwd_bwd_60k_fwd": model(60_000, 330_000),
             "odin_grid_90k_fwd_bwd_1.9M_fwd": model(1_900_000, 90_000),
             "odin_final_175k_fwd_bwd_175k_fwd": model(175_000, 175_000)}
    return {k: {"measured_s": phases[k], "throughput_model_s": round(v, 1), "measured_over_model": round(phases[k] / v, 2)}
            for k, v in pairs.items()}


# -- printing ------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    runs, totals = report["benchmarks"], report["totals"]
    lines = [f"Plans ({report['seeds']} seeds, every installed detector, `--device cuda`), from `make_plan`:", "",
             "| benchmark | model | prepare tasks | detector tasks | prepare h / seed | detectors h / seed "
             "| longest detector | critical path h | store / seed GB | store GB |",
             "|---|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name, r in runs.items():
        detectors_h = sum(c["held_seconds"] for c in r["detector_seconds_per_seed"].values()) / 3600
        lines.append(f"| {name} | {r['model']} | {r['tasks_per_kind']['sources']} | {r['tasks_per_kind']['detector']} "
                     f"| {r['prepare_seconds']['held'] / 3600:.2f} | {detectors_h:.2f} | {r['longest_detector']} "
                     f"({r['detector_seconds_per_seed'][r['longest_detector']]['held_seconds'] / 60:.0f} min) "
                     f"| {r['critical_path_seconds'] / 3600:.2f} | {sum(r['store_bytes_per_seed'].values()) / GB:.1f} "
                     f"| {r['store_bytes'] / GB:.0f} |")
    lines += ["", "GPU-hours per kind, the whole study (GPU compute: network passes and GPU fits; held: the task's "
              "whole duration, CPU parts included, since every task of a GPU run holds a GPU):", "",
              "| kind | tasks | GPU compute h | GPU held h |", "|---|---:|---:|---:|"]
    for kind, held in totals["held_hours_per_kind"].items():
        tasks = sum(r["per_kind"][kind]["tasks"] for r in runs.values())
        lines.append(f"| {kind} | {tasks} | {totals['gpu_hours_per_kind'][kind]:.1f} | {held:.1f} |")
    lines.append(f"| total | {sum(totals['tasks_per_kind'].values())} | {sum(totals['gpu_hours_per_kind'].values()):.1f} "
                 f"| {totals['held_hours_one_gpu']:.1f} |")
    lines += ["", "Wall time (hours): GPU-held hours / GPUs, never below the critical path (a seed's prepare, then "
              "its longest detector task); on 8 and 64 GPUs every detector task also reads its seed back from the "
              f"store ({totals['held_hours_many_gpus']:.1f} GPU-held hours in all):", "",
              "| GPUs | GPU-h / GPUs | critical path | estimate | bound by | greedy list schedule |",
              "|---:|---:|---:|---:|---|---:|"]
    for g, w in report["wall_hours"].items():
        lines.append(f"| {g} | {w['gpu_hours_over_gpus']:.1f} | {w['critical_path']:.1f} | {w['estimate']:.1f} "
                     f"| {w['bound']} | {w['greedy_schedule']:.1f} |")
    first = next(iter(runs))
    lines += ["", f"Per detector task ({first}, one seed): GPU s / CPU s / passes (forward; forward+backward):", "",
              "| detector | GPU s | CPU s | forward | forward+backward | how |", "|---|---:|---:|---:|---:|---|"]
    for label, c in runs[first]["detector_seconds_per_seed"].items():
        lines.append(f"| {label} | {c['gpu_seconds']:.1f} | {c['cpu_seconds']:.1f} | {c['passes']['forward']:,} "
                     f"| {c['passes']['forward_backward']:,} | {c['note']} |")
    p = runs[first]["prepare_seconds"]
    lines += ["", f"Prepare task ({first}): training {p['training'] / 3600:.2f} h, extraction {p['extraction']:.0f} s, "
              f"attacks {p['attacks']:.0f} s, data loading and store writes {p['data_and_store']:.0f} s.",
              f"Store ({first}, per seed, GB): " + ", ".join(f"{k} {v / GB:.2f}" for k, v in
                                                            runs[first]["store_bytes_per_seed"].items()) + ".",
              "", "Throughput model against the measured phases (DenseNet fp32): " + "; ".join(
                  f"{k} measured {v['measured_s']:.0f} s, rates {v['throughput_model_s']:.0f} s"
                  for k, v in report["checks"].items()) + "."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "paper-scale-plan.json"),
                        help="JSON file to write (default benchmarks/results/paper-scale-plan.json)")
    parser.add_argument("--seeds", type=int, default=SEEDS)
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report = study(build_registry(strict=True), tuple(args.benchmarks.split(",")), args.seeds)
    text = markdown(report)
    report["markdown"] = text
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    print(text)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
