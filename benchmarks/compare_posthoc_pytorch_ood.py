"""Issue 21's post-hoc detectors against pytorch-ood 0.4 on one shared extraction: AUROCs, scores, seconds.

The network (the pretrained ResNet-20 in ``shared/models``, built by oodbench's ``cifar-resnet``
plugin) runs ONCE over the images (read by oodbench's ``npz`` plugin, as
``cifar10-resnet20-vs-pytorch-ood.toml`` and ``examples/cifar10-resnet20-npz.toml`` read
them): the fit split (CIFAR-10 train), the validation split carved from its end (KL-matching
fits its templates there, on both sides), CIFAR-10 test (in-distribution) and MNIST as 32x32
RGB (out-of-distribution). Passes run in float32, as the comparison benchmark's do (another
CPU's kernels may move the arrays, and so the AUROCs, in their last bits; both sides always
share them). Both sides then get those arrays, and no further network pass:

* oodbench: each detector built from the registry with its default options, ``fit`` on a
  ``FitContext`` of ``SplitView``\\ s (the engine's ``ClassifierHandle`` as ``ctx.model``, for the
  head), ``score`` on the test and MNIST views;
* pytorch-ood: its class with the same hyperparameters, ``fit_features``/``fit_logits``/
  ``fit_feature_maps`` on the same training arrays and ``predict_features``/
  ``predict_logits``/``predict_feature_maps`` on the same test arrays, with the network's
  ``head`` (an ``nn.Linear``) as the head. Its tensors are float64 copies of the shared float32
  arrays (the same values) and it runs with torch's default dtype set to float64, so the
  comparison measures formulas rather than float32 rounding; ViM, NNGuide, fDBD and NCI
  cast to float32 inside (``.float()``), so they get the float32 arrays and head and compute
  in float32 (named in their rows). The same detectors run again on the float32 arrays with
  torch's default dtype, as a user would call them (``auroc_pytorch_ood_float32``).

pytorch-ood returns outlier scores (higher = more OOD); each row maps them onto ours by the
transformation its ``transform`` names (``-theirs`` unless said otherwise: GEN averages the M
terms where we sum them, ours = -M x theirs; RMD takes scatter matrices, not divided by N,
plus 1e-6 I, ours ~ -N x theirs). AUROC (one function, oodbench's, for both sides; CIFAR-10
test positive, MNIST negative) and score differences are computed after it:
``max_relative_difference`` = max_i |ours_i - t(theirs_i)| / max_i |ours_i| over every scored
input (a normwise relative difference: elementwise ratios blow up where a score crosses zero;
``max_elementwise_relative_difference`` is reported too). ``factor`` is the median of
ours / (-theirs), what the named scale factors should be.

Sizes: full: fit on 3,500 CIFAR-10 train images (``cifar10_train_exact_first4000.npz`` less
the 500 validation images at its end), score all 10,000 test images (the JPEG copy, see
shared/data/PROVENANCE.md) and all 10,000 MNIST test images. ``--quick`` (for tests): fit on
400, validate on 100, score the 100 exact test images and 200 MNIST images.

    python benchmarks/compare_posthoc_pytorch_ood.py [--quick] [--out FILE.json] [--shared DIR]

Full mode writes ``benchmarks/results/posthoc-vs-pytorch-ood.json`` unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from oodbench.api import NEEDS, DatasetContext, FitContext, ImageSet, SplitView
from oodbench.benchmark import Benchmark, load_benchmark
from oodbench.classifier import ClassifierHandle
from oodbench.metrics import auroc
from oodbench.plugins import Registry, build_registry, instantiate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare_pytorch_ood import build_network, default_shared_dir, machine  # noqa: E402  (a script folder)

BENCHMARK = HERE / "cifar10-resnet20-vs-pytorch-ood.toml"
RESULT = HERE / "results" / "posthoc-vs-pytorch-ood.json"


@dataclass(frozen=True)
class Pair:
    """One oodbench detector, its pytorch-ood counterpart, and how their scores relate."""

    detector: str  #: oodbench's registry name (default options)
    cls: str  #: pytorch-ood's class
    settings: str  #: the hyperparameters both sides use
    transform: str = "-theirs"  #: theirs onto ours: "-theirs", "-M*theirs" (GEN), "-N*theirs" (RMD)
    same_formula: bool = True  #: False where a documented difference changes scores beyond rounding
    difference: str = ""  #: the documented difference, if any
    float32: bool = False  #: pytorch-ood casts to float32 inside


PAIRS = [
    Pair("energy", "EnergyBased", "T = 1"),
    Pair("maxlogit", "MaxLogit", "-"),
    Pair("entropy", "Entropy", "-", same_formula=False,
         difference="pytorch-ood clips p to [1e-7, 1] before p log p"),
    Pair("gen", "GEN", "gamma = 0.1, M = 10 (all classes)", transform="-M*theirs", same_formula=False,
         difference="pytorch-ood averages the M terms (ours sum them: ours = -M x theirs) and clamps p to "
                    "[1e-7, 1 - 1e-7]"),
    Pair("kl-matching", "KLMatching", "templates fitted on the validation split"),
    Pair("react", "ReAct", "percentile 90"),
    Pair("ash-p", "ASH", "variant ash-p, percentile 90"),
    Pair("ash-b", "ASH", "variant ash-b, percentile 90"),
    Pair("ash-s", "ASH", "variant ash-s, percentile 90"),
    Pair("scale", "SCALE", "percentile 85"),
    Pair("dice", "DICE", "sparsity 90 (p = 0.9)", float32=True,
         difference="pytorch-ood fits in float32 (its torch.quantile needs the default dtype)"),
    Pair("gradnorm", "GradNorm", "T = 1, gradient of the head's weight only"),
    Pair("knn", "KNN", "k = 50, normalised features"),
    Pair("nnguide", "NNGuide", "k = 10", float32=True, difference="pytorch-ood computes in float32"),
    Pair("rmds", "RMD", "-", transform="-N*theirs", same_formula=False,
         difference="pytorch-ood's covariances are scatter matrices (not divided by N) plus 1e-6 I: "
                    "ours ~ -N x theirs, but for the ridge"),
    Pair("vim", "ViM", "principal dimension 32 (of 64)", float32=True, difference="pytorch-ood computes in float32"),
    Pair("she", "SHE", "patterns of correctly classified training inputs"),
    Pair("fdbd", "fDBD", "-", float32=True, difference="pytorch-ood computes in float32"),
    Pair("nci", "NCI", "alpha = 1e-4 on both sides (pytorch-ood's default is 0)", float32=True,
         difference="pytorch-ood computes in float32"),
]
#: issue 21's detectors that pytorch-ood 0.4 does not implement (none: every one has a counterpart)
WITHOUT_COUNTERPART: list[str] = []

ASH_PERCENTILE, SCALE_PERCENTILE, REACT_PERCENTILE, DICE_SPARSITY = 0.90, 0.85, 0.90, 0.90
VIM_DIM, KNN_K, NNGUIDE_K, NCI_ALPHA, GEN_GAMMA = 32, 50, 10, 1e-4, 0.1


# ------------------------------------------------------------------------------------------------
# One extraction
# ------------------------------------------------------------------------------------------------
def comparison_benchmark(quick: bool) -> Benchmark:
    bench = load_benchmark(BENCHMARK)
    if not quick:
        return bench
    idd, mnist = bench.in_distribution, bench.ood[0]
    # The JPEG test file is sorted by class; the exact first-100 file is in the original, mixed order.
    small_id = replace(idd, options={**idd.options, "test": "data/cifar10_test_exact_first100.npz",
                                     "val_from_train": 100, "limit": 400})
    return replace(bench, in_distribution=small_id, ood=(replace(mnist, options={**mnist.options, "limit": 200}),))


@dataclass
class Extracted:
    """Images, logits and penultimate features of every split, and the handle whose head both sides use."""

    images: dict[str, ImageSet]
    logits: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    handle: ClassifierHandle
    seconds: float


def extract(bench: Benchmark, registry: Registry, data_dir: Path) -> Extracted:
    started = time.perf_counter()
    ref = bench.in_distribution
    dataset = instantiate(registry.get("datasets", ref.plugin), ref.options, seed=0)
    images = {split: dataset.load(DatasetContext(split=split, seed=0, data_dir=data_dir))
              for split in ("train", "val", "test")}
    ood = bench.ood[0]
    source = instantiate(registry.get("datasets", ood.dataset), ood.options, seed=0)
    images["ood"] = source.load(DatasetContext(split="test", seed=0, data_dir=data_dir,
                                               image_shape=images["test"].image_shape, size=len(images["test"])))
    network = build_network(bench, registry, data_dir, images["train"])
    handle = ClassifierHandle(network, torch.device("cpu"), batch_size=bench.batch_size)
    logits, features = {}, {}
    for split, image_set in images.items():
        out, feats = handle.outputs(image_set.tensor())
        logits[split], features[split] = out.numpy(), feats.numpy()
    return Extracted(images, logits, features, handle, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------------
# oodbench
# ------------------------------------------------------------------------------------------------
def views(data: Extracted) -> dict[str, SplitView]:
    scoring = NEEDS - {"labels"}
    out = {}
    for split in ("train", "val", "test", "ood"):
        labelled = split in ("train", "val")
        out[split] = SplitView(split, data.logits[split], data.features[split], data.images[split],
                               data.images[split].y if labelled else None, NEEDS if labelled else scoring)
    return out


def run_oodbench(name: str, data: Extracted, split_views: dict[str, SplitView], registry: Registry
                 ) -> tuple[dict[str, np.ndarray], float, float]:
    detector = instantiate(registry.get("detectors", name), {}, seed=0)
    ctx = FitContext(split_views["train"], split_views["val"], data.images["train"].num_classes, 0,
                     torch.device("cpu"), data.handle)
    clock = time.perf_counter()
    detector.fit(ctx)
    fit_seconds = time.perf_counter() - clock
    clock = time.perf_counter()
    scores = {split: np.asarray(detector.score(split_views[split]), np.float64) for split in ("test", "ood")}
    return scores, fit_seconds, time.perf_counter() - clock


# ------------------------------------------------------------------------------------------------
# pytorch-ood
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def pytorch_ood_detector(pair: Pair, head: torch.nn.Linear, num_classes: int
                         ) -> tuple[Callable[[dict[str, torch.Tensor]], Any], Callable[[dict[str, torch.Tensor]], torch.Tensor]]:
    """(fit, predict) for pair's pytorch-ood class; each takes a split's tensors: z, logits, y."""
    from pytorch_ood import detector as pood

    def maps(z: torch.Tensor) -> torch.Tensor:  # ReAct/ASH/SCALE take B x C x H x W maps: the pooled vector as 1 x 1
        return z[:, :, None, None]

    def flat_head(x: torch.Tensor) -> torch.Tensor:
        return head(x.flatten(1))

    def nothing(split: dict[str, torch.Tensor]) -> None:
        return None

    name = pair.detector
    if name in ("energy", "maxlogit", "entropy", "gen"):
        det = {"energy": lambda: pood.EnergyBased(None, t=1.0), "maxlogit": lambda: pood.MaxLogit(None),
               "entropy": lambda: pood.Entropy(None), "gen": lambda: pood.GEN(None, gamma=GEN_GAMMA)}[name]()
        return nothing, lambda s: det.predict_logits(s["logits"])
    if name == "kl-matching":
        det = pood.KLMatching(None)
        return lambda s: det.fit_logits(s["logits"]), lambda s: det.predict_logits(s["logits"])
    if name == "react":
        det = pood.ReAct(backbone=None, head=flat_head, percentile=REACT_PERCENTILE)
        return lambda s: det.fit_feature_maps(maps(s["z"]), s["y"]), lambda s: det.predict_feature_maps(maps(s["z"]))
    if name.startswith("ash-"):
        det = pood.ASH(backbone=None, head=flat_head, variant=name, percentile=ASH_PERCENTILE)
        return nothing, lambda s: det.predict_feature_maps(maps(s["z"]))
    if name == "scale":
        det = pood.SCALE(backbone=None, head=flat_head, percentile=SCALE_PERCENTILE)
        return nothing, lambda s: det.predict_feature_maps(maps(s["z"]))
    if name == "dice":
        det = pood.DICE(None, head.weight, head.bias, p=DICE_SPARSITY)
        return lambda s: det.fit_features(s["z"], s["y"]), lambda s: det.predict_features(s["z"])
    if name == "gradnorm":
        det = pood.GradNorm(head, param_filter=lambda param: param == "weight", temperature=1.0)
        return lambda s: det.fit(None), lambda s: det.predict(s["z"])
    if name == "knn":
        det = pood.KNN(None, k=KNN_K)
    elif name == "nnguide":
        det = pood.NNGuide(None, head, k=NNGUIDE_K)
    elif name == "rmds":
        det = pood.RMD(None)
    elif name == "vim":
        det = pood.ViM(None, d=VIM_DIM, w=head.weight, b=head.bias)
    elif name == "she":
        det = pood.SHE(None, head)
    elif name == "fdbd":
        det = pood.fDBD(None, head)
    elif name == "nci":
        det = pood.NCI(None, head, alpha=NCI_ALPHA)
    else:
        raise KeyError(name)
    return lambda s: det.fit_features(s["z"], s["y"]), lambda s: det.predict_features(s["z"])


@contextlib.contextmanager
def float_means_double() -> Iterator[None]:
    """``Tensor.float()`` returns float64 inside (as plugins/tests/test_detector_posthoc_features.py runs pytorch-ood's ViM)."""
    original = torch.Tensor.float
    torch.Tensor.float = torch.Tensor.double
    try:
        yield
    finally:
        torch.Tensor.float = original


def run_pytorch_ood(pair: Pair, data: Extracted, mode: str = "float64") -> tuple[dict[str, np.ndarray], float, float]:
    """pytorch-ood's scores of test and MNIST (outlier scores, as it returns them), fit and predict seconds.

    ``mode``: "float64" (float64 tensors and head, torch's default dtype float64, except for the pairs that cast
    to float32 inside: float32 for those), "float32" (everything float32, as a user calls it) or "patched64"
    (float64, with ``Tensor.float`` made ``Tensor.double`` so that the float32 casts inside stay float64).
    """
    if mode == "patched64":
        with float_means_double():
            return run_pytorch_ood(replace(pair, float32=False), data, "float64")
    dtype = torch.float64 if mode == "float64" and not pair.float32 else torch.float32
    head = copy.deepcopy(data.handle.network.head).to(dtype).eval()
    for parameter in head.parameters():
        parameter.requires_grad_(pair.detector == "gradnorm")  # GradNorm differentiates the weight
    tensors = {split: {"z": torch.tensor(data.features[split]).to(dtype),
                       "logits": torch.tensor(data.logits[split]).to(dtype),
                       "y": torch.tensor(np.asarray(data.images[split].y if data.images[split].y is not None
                                                    else np.full(len(data.logits[split]), -1)), dtype=torch.long)}
               for split in data.logits}
    with default_dtype(dtype):
        fit, predict = pytorch_ood_detector(pair, head, data.images["train"].num_classes)
        clock = time.perf_counter()
        with torch.no_grad() if pair.detector != "gradnorm" else contextlib.nullcontext():
            fit(tensors["val" if pair.detector == "kl-matching" else "train"])
        fit_seconds = time.perf_counter() - clock
        clock = time.perf_counter()
        scores = {}
        for split in ("test", "ood"):
            with torch.no_grad() if pair.detector != "gradnorm" else contextlib.nullcontext():
                scores[split] = predict(tensors[split]).detach().double().cpu().numpy()
        return scores, fit_seconds, time.perf_counter() - clock


# ------------------------------------------------------------------------------------------------
# Comparison
# ------------------------------------------------------------------------------------------------
def to_ours(pair: Pair, theirs: np.ndarray, data: Extracted) -> np.ndarray:
    """pytorch-ood's outlier scores mapped onto ours by the pair's documented transformation."""
    if pair.transform == "-theirs":
        return -theirs
    if pair.transform == "-M*theirs":
        return -min(100, data.images["train"].num_classes) * theirs  # ours: M = 100, clamped to the classes
    if pair.transform == "-N*theirs":
        return -len(data.images["train"]) * theirs
    raise ValueError(pair.transform)


def differences(ours: np.ndarray, mapped: np.ndarray) -> dict[str, float]:
    gap = np.abs(ours - mapped)
    magnitude = np.abs(ours)
    nonzero = magnitude > 0
    return {"max_abs_difference": float(gap.max()),
            "max_relative_difference": float(gap.max() / magnitude.max()) if magnitude.max() > 0 else float(gap.max()),
            "max_elementwise_relative_difference": float((gap[nonzero] / magnitude[nonzero]).max())
            if nonzero.any() else 0.0}


def clamp_rows(pair: Pair, data: Extracted) -> np.ndarray | None:
    """For entropy and GEN: the scored inputs (test then MNIST) with a softmax probability pytorch-ood clips."""
    if pair.detector not in ("entropy", "gen"):
        return None
    logits = np.concatenate([data.logits["test"], data.logits["ood"]]).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    clipped = p.min(1) < 1e-7
    if pair.detector == "gen":
        clipped |= p.max(1) > 1 - 1e-7
    return clipped


def compare_pair(pair: Pair, data: Extracted, split_views: dict[str, SplitView], registry: Registry) -> dict[str, Any]:
    ours, ours_fit, ours_score = run_oodbench(pair.detector, data, split_views, registry)
    theirs, theirs_fit, theirs_score = run_pytorch_ood(pair, data, "float64")
    theirs32, _, _ = run_pytorch_ood(pair, data, "float32")
    a = auroc(ours["test"], ours["ood"])
    mapped = {split: to_ours(pair, theirs[split], data) for split in theirs}
    mapped32 = {split: to_ours(pair, theirs32[split], data) for split in theirs32}
    b, b32 = auroc(mapped["test"], mapped["ood"]), auroc(mapped32["test"], mapped32["ood"])
    all_ours = np.concatenate([ours["test"], ours["ood"]])
    all_mapped = np.concatenate([mapped["test"], mapped["ood"]])
    raw = -np.concatenate([theirs["test"], theirs["ood"]])
    usable = np.abs(raw) > 0
    row: dict[str, Any] = {
        "detector": pair.detector, "pytorch_ood": pair.cls, "settings": pair.settings, "transform": pair.transform,
        "same_formula": pair.same_formula, "difference": pair.difference,
        "pytorch_ood_dtype": "float32" if pair.float32 else "float64",
        "auroc_oodbench": a, "auroc_pytorch_ood": b, "auroc_difference": a - b,
        **differences(all_ours, all_mapped),
        "factor": float(np.median(all_ours[usable] / raw[usable])) if usable.any() else None,
        "auroc_pytorch_ood_float32": b32, "auroc_difference_float32": a - b32,
        "max_relative_difference_float32": differences(all_ours, np.concatenate([mapped32["test"],
                                                                                 mapped32["ood"]]))["max_relative_difference"],
        "distinct_scores": {"oodbench": int(np.unique(all_ours).size), "pytorch_ood": int(np.unique(all_mapped).size),
                            "pytorch_ood_float32": int(np.unique(np.concatenate(list(mapped32.values()))).size),
                            "scored": int(all_ours.size)},
        "seconds": {"oodbench_fit": ours_fit, "oodbench_score": ours_score,
                    "pytorch_ood_fit": theirs_fit, "pytorch_ood_score": theirs_score},
    }
    if pair.float32:  # the named difference is float32: with the casts kept in float64 the scores must agree
        patched, _, _ = run_pytorch_ood(pair, data, "patched64")
        mapped64 = {split: to_ours(pair, patched[split], data) for split in patched}
        row["patched_float64"] = {"auroc_pytorch_ood": auroc(mapped64["test"], mapped64["ood"]),
                                  **differences(all_ours, np.concatenate([mapped64["test"], mapped64["ood"]]))}
        row["patched_float64"]["auroc_difference"] = a - row["patched_float64"]["auroc_pytorch_ood"]
    clipped = clamp_rows(pair, data)
    if clipped is not None:  # the clamp is the difference: off it the scores must agree
        row["clipped_inputs"] = int(clipped.sum())
        row["unclipped"] = differences(all_ours[~clipped], all_mapped[~clipped]) if (~clipped).any() else None
    return row


def compare(shared_dir: Path, quick: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Extract once, then fit and score every pair on both sides (see the module docstring)."""
    registry = build_registry(strict=True)
    bench = comparison_benchmark(quick)
    load_before = os.getloadavg()
    data = extract(bench, registry, shared_dir)
    split_views = views(data)
    import pytorch_ood

    rows = [compare_pair(pair, data, split_views, registry) for pair in PAIRS if only is None or pair.detector in only]
    accuracy = float((data.logits["test"].argmax(1) == data.images["test"].y).mean())
    return {
        "mode": "quick" if quick else "full", "machine": machine(), "pytorch_ood": pytorch_ood.__version__,
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "images": {split: len(image_set) for split, image_set in data.images.items()},
        "test_accuracy": accuracy, "extraction_seconds": data.seconds,
        "extraction": "one float32 pass per image, shared by every detector on both sides",
        "without_counterpart": WITHOUT_COUNTERPART, "detectors": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = ["| detector | pytorch-ood | oodbench AUROC | pytorch-ood AUROC | difference | max rel. score diff. "
             "| oodbench s (fit + score) | pytorch-ood s (fit + score) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["detectors"]:
        s = r["seconds"]
        note = r["difference"] + (f" (transform {r['transform']})" if r["transform"] != "-theirs" else "")
        lines.append(f"| {r['detector']} | {r['pytorch_ood']} | {r['auroc_oodbench']:.6f} | {r['auroc_pytorch_ood']:.6f} "
                     f"| {r['auroc_difference']:.1e} | {r['max_relative_difference']:.1e} "
                     f"| {s['oodbench_fit']:.3f} + {s['oodbench_score']:.3f} "
                     f"| {s['pytorch_ood_fit']:.3f} + {s['pytorch_ood_score']:.3f} | {note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few hundred images, for tests")
    parser.add_argument("--out", help=f"write the comparison as JSON here (full mode default: {RESULT.relative_to(HERE.parent)})")
    parser.add_argument("--shared", type=Path, default=default_shared_dir(),
                        help="folder holding data/ and models/ (default: $OODBENCH_SHARED_DIR or ../shared)")
    parser.add_argument("--detectors", help="comma-separated oodbench names (default: all)")
    args = parser.parse_args(argv)
    result = compare(args.shared, quick=args.quick, only=args.detectors.split(",") if args.detectors else None)
    result["command"] = " ".join(["python", "benchmarks/compare_posthoc_pytorch_ood.py",
                                  *(sys.argv[1:] if argv is None else argv)])
    out = args.out or (None if args.quick or args.detectors else RESULT)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\n{result['mode']}: {result['images']}, test accuracy {result['test_accuracy']:.4f}, "
          f"extraction {result['extraction_seconds']:.1f} s, pytorch-ood {result['pytorch_ood']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
