"""ClassifierHandle: batching that survives out-of-memory, and pass counts that stay exact."""
import copy

import pytest
import torch

from oodbench.api import PluginError
from oodbench.classifier import ClassifierHandle


class Picky(torch.nn.Module):
    """A linear classifier that runs out of memory on batches larger than ``limit``, as a GPU would."""

    def __init__(self, limit: int):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(12, 3)
        self.limit = limit
        self.sizes: list[int] = []

    def forward_features(self, x):
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory: batch of {len(x)}")
        self.sizes.append(len(x))
        flat = x.flatten(1)
        return self.linear(flat), flat


def test_out_of_memory_halves_the_batch_and_gives_the_same_outputs():
    images = torch.rand(100, 3, 2, 2)
    reference = ClassifierHandle(Picky(limit=1000), torch.device("cpu"), batch_size=64)
    handle = ClassifierHandle(Picky(limit=20), torch.device("cpu"), batch_size=64)
    assert torch.equal(handle.logits(images), reference.logits(images))
    assert handle.batch_sizes["forward"] == 16 and handle.memory_backoffs == 2  # 64 -> 32 -> 16
    assert handle.network.sizes == [16] * 6 + [4]
    assert handle.passes["other"] == {"forward": 100, "forward_backward": 0}, "failed batches are not passes"
    objective = lambda logits, feats: logits.log_softmax(1)[:, 0]  # noqa: E731
    assert torch.allclose(handle.input_gradient(images, objective), reference.input_gradient(images, objective))
    assert handle.passes["other"]["forward_backward"] == 100


def test_targets_follow_the_batches_when_out_of_memory_halves_them():
    """A label-dependent objective (the attacks' cross-entropy) must see its own images' labels."""
    images, labels = torch.rand(50, 3, 2, 2), torch.arange(50) % 3
    objective = lambda logits, feats, y: torch.nn.functional.cross_entropy(logits, y, reduction="none")  # noqa: E731
    reference = ClassifierHandle(Picky(limit=1000), torch.device("cpu"), batch_size=64)
    handle = ClassifierHandle(Picky(limit=8), torch.device("cpu"), batch_size=64)
    expected = reference.input_gradient(images, objective, targets=labels)
    assert torch.allclose(handle.input_gradient(images, objective, targets=labels), expected)
    assert handle.batch_sizes["forward_backward"] == 8
    one_by_one = torch.cat([reference.input_gradient(images[i:i + 1], objective, targets=labels[i:i + 1])
                            for i in range(len(images))])
    assert torch.allclose(expected, one_by_one, atol=1e-7)
    with pytest.raises(ValueError, match="49 targets for 50 images"):
        handle.input_gradient(images, objective, targets=labels[:49])


def test_out_of_memory_at_one_image_is_a_clear_error():
    handle = ClassifierHandle(Picky(limit=0), torch.device("cpu"), batch_size=4)
    with pytest.raises(PluginError, match="out of memory on cpu even with one image per batch"):
        handle.logits(torch.rand(3, 3, 2, 2))


def _conv_net():
    """The fake benchmark's network (a convolution, a hidden layer, a linear head), untrained."""
    from fake_plugins.classifier import TinyNet

    return TinyNet(width=8).build((3, 16, 16), 5, seed=0).eval()


def test_bf16_and_channels_last_change_only_the_last_bits_and_return_float32():
    """The GPU speed options, exercised on the CPU (the runner enables them only on CUDA)."""
    images = torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    objective = lambda logits, feats: logits.log_softmax(1).max(1).values  # noqa: E731
    plain = ClassifierHandle(_conv_net(), torch.device("cpu"))
    logits, features = plain.outputs(images)
    gradient = plain.input_gradient(images, objective)
    # bf16 keeps 8 bits of mantissa: outputs within a few percent, gradients pointing the same way
    for options, tolerance, alignment in (({"channels_last": True}, 1e-5, 0.9999), ({"bf16": True}, 5e-2, 0.95)):
        handle = ClassifierHandle(_conv_net(), torch.device("cpu"), **options)
        other_logits, other_features = handle.outputs(images)
        other_gradient = handle.input_gradient(images, objective)
        assert other_logits.dtype == other_features.dtype == other_gradient.dtype == torch.float32
        scale = logits.abs().max()
        assert (other_logits - logits).abs().max() <= tolerance * scale
        assert (other_features - features).abs().max() <= tolerance * features.abs().max()
        assert torch.nn.functional.cosine_similarity(other_gradient.flatten(1), gradient.flatten(1)).min() > alignment
    bf16_logits = ClassifierHandle(_conv_net(), torch.device("cpu"), bf16=True).logits(images)
    assert not torch.equal(bf16_logits, logits), "autocast did not engage"
    assert ClassifierHandle(_conv_net(), torch.device("cpu"), bf16=True, channels_last=True).numerics == \
        "bf16+channels-last"


def test_throughput_counts_every_image_and_charges_nested_activities_to_the_inner_one():
    handle = ClassifierHandle(_conv_net(), torch.device("cpu"), batch_size=16)
    images = torch.rand(40, 3, 16, 16)
    with handle.activity("outer"):
        handle.outputs(images)
        with handle.activity("inner"):
            handle.input_gradient(images[:8], lambda logits, feats: logits[:, 0])
    report = handle.throughput()
    assert report["outer"]["images"] == 40 and report["inner"]["images"] == 8
    for entry in report.values():
        assert 0 < entry["network_seconds"] <= entry["wall_seconds"]
        assert 0 < entry["network_share"] <= 1
        assert entry["images_per_second"] == pytest.approx(entry["images"] / entry["wall_seconds"])


def test_float64_passes_equal_a_float64_network_rounded_to_float32():
    """Inside ``float64()`` outputs are the float64 network's, rounded once to float32; gradients likewise."""
    class Small(torch.nn.Sequential):
        def forward_features(self, x):
            return self(x), x.flatten(1)

    torch.manual_seed(0)
    network = Small(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3))
    images = torch.rand(10, 1, 4, 4)
    handle = ClassifierHandle(network, torch.device("cpu"), batch_size=4)
    reference64 = copy.deepcopy(network).double()
    with handle.float64():
        logits = handle.logits(images)
        grad = handle.input_gradient(images, lambda out, feats: out.log_softmax(1)[:, 0])
    assert logits.dtype == torch.float32 and torch.equal(logits, reference64(images.double()).float())
    x = images.double().requires_grad_(True)
    (expected,) = torch.autograd.grad(reference64(x).log_softmax(1)[:, 0].sum(), x)
    assert grad.dtype == torch.float32 and torch.equal(grad, expected.float())
    assert handle.network[0].weight.dtype == torch.float32, "the float32 network is left as it was"
    assert torch.equal(handle.logits(images), network(images)), "outside the block, plain float32 again"
