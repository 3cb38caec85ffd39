"""The offline real-data check: pretrained ResNet-20 on real CIFAR-10 files, through the generic plugins only.

Reads ``../shared`` beside the checkout (or ``$OODBENCH_SHARED_DIR``); skipped where the
files are absent. Nothing here special-cases these files: the benchmark is the shipped
bring-your-own-data example.
"""
import dataclasses

import pytest
import torch

from oodbench.benchmark import load_benchmark
from oodbench.cli import parse_detectors
from oodbench.leaderboard import results_frame
from oodbench.runner import RunOptions, run_benchmark
from shared_files import ROOT, SHARED, needs_shared

NEEDED = ["data/cifar10_train_exact_first4000.npz", "data/cifar10_test_jpeg.npz", "data/mnist_test.npz",
          "models/akamaster_resnet_cifar10/resnet20-12fca82f.th"]

pytestmark = needs_shared(NEEDED)


@pytest.fixture(scope="module")
def real_run(registry, shared_cache):
    # float32 passes: this checks accuracy and the detectors' claims, not cross-machine equality, and the example's
    # float64 passes would double the module's time.
    bench = dataclasses.replace(load_benchmark(ROOT / "examples" / "cifar10-resnet20-npz.toml"), precision="float32")
    opts = RunOptions(benchmark=bench, detectors=parse_detectors("msp,logits,temperature,mahalanobis,gmm,zheng"),
                      seeds=[0], cache_dir=shared_cache, data_dir=SHARED, device=torch.device("cpu"), progress=False)
    result = run_benchmark(opts, registry)
    return result, results_frame(result.rows).set_index(["detector", "source"])


def test_pretrained_resnet20_reaches_its_known_accuracy_on_the_jpeg_test_set(real_run):
    result, _ = real_run
    # PROVENANCE.md: 81.03% on cifar10_test_jpeg.npz (91.7% on the exact test set).
    assert 0.80 <= result.meta["per_seed"][0]["test_accuracy"] <= 0.82


def test_every_detector_is_finite_on_every_real_source(real_run):
    _, frame = real_run
    assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"]["error"]
    sources = set(frame.index.get_level_values("source"))
    assert {"mistakes", "ood:mnist", "ood:gaussian", "ood:uniform", "adv:fgsm:0.05:flipped", "adv:bim:0.05:flipped"} <= sources


def test_feature_densities_beat_softmax_on_bim(real_run):
    _, frame = real_run
    auroc = frame["auroc"]
    # BIM drives the softmax to confident wrong answers: MSP ranks adversarial inputs above clean ones.
    assert auroc[("msp", "adv:bim:0.05:flipped")] < 0.3
    for density in ("gmm", "mahalanobis"):
        assert auroc[(density, "adv:bim:0.05:flipped")] > auroc[("msp", "adv:bim:0.05:flipped")] + 0.4
    # Baseline on mistakes behaves as the literature says: clearly informative.
    assert auroc[("msp", "mistakes")] > 0.8
