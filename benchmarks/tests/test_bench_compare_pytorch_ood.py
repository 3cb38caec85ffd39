"""oodbench against pytorch-ood 0.4, the quick mode of ``benchmarks/compare_pytorch_ood.py``, in-process.

Needs pytorch-ood (part of the ``test`` extra, or ``pip install -e ".[bench]"``) and the real
files in ``../shared`` beside the checkout (or ``$OODBENCH_SHARED_DIR``); skipped without either.
The full comparison and its figures are in BENCHMARKS.md.
"""

import pytest

pytest.importorskip("pytorch_ood")

from shared_files import SHARED, needs_shared  # noqa: E402  (after the importorskip)

NEEDED = ["data/cifar10_train_exact_first4000.npz", "data/cifar10_test_exact_first100.npz", "data/mnist_test.npz",
          "models/akamaster_resnet_cifar10/resnet20-12fca82f.th"]

pytestmark = needs_shared(NEEDED)

import compare_pytorch_ood  # a script of benchmarks/ (on sys.path from conftest)


@pytest.fixture(scope="module")
def comparison():
    return compare_pytorch_ood.compare(SHARED, quick=True)


def test_oodbench_pushes_fewer_images_through_the_network(comparison):
    ours, theirs = comparison["oodbench"]["passes"], comparison["pytorch_ood"]["passes"]
    assert ours["network_forwards"] < theirs["network_forwards"]
    # pytorch-ood reruns the network for each detector: one pass per scored image each, plus a train pass per fit
    scored = comparison["images"]["test"] + comparison["images"]["ood:mnist"]
    assert theirs["forward"] == 4 * scored + 2 * comparison["images"]["train"]


def test_msp_auroc_is_the_same_on_both_sides(comparison):
    # Same logits; at this size no float32 softmax ties cross ID and OOD (at full size they do: BENCHMARKS.md).
    msp = comparison["auroc"]["msp"]
    assert abs(msp["difference"]) <= 1e-6


def test_matching_detectors_agree(comparison):
    for method in ("odin", "mahalanobis"):
        assert abs(comparison["auroc"][method]["difference"]) <= 1e-3, method
