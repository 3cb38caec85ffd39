"""ClassifierHandle: batching that survives out-of-memory, and pass counts that stay exact."""
import pytest
import torch

from oodbench.api import ClassifierHandle, PluginError


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
    assert handle.batch_size == 16 and handle.memory_backoffs == 2  # 64 -> 32 -> 16
    assert handle.network.sizes == [16] * 6 + [4]
    assert handle.passes["other"] == {"forward": 100, "forward_backward": 0}, "failed batches are not passes"
    objective = lambda logits, feats: logits.log_softmax(1)[:, 0]  # noqa: E731
    assert torch.allclose(handle.input_gradient(images, objective), reference.input_gradient(images, objective))
    assert handle.passes["other"]["forward_backward"] == 100


def test_out_of_memory_at_one_image_is_a_clear_error():
    handle = ClassifierHandle(Picky(limit=0), torch.device("cpu"), batch_size=4)
    with pytest.raises(PluginError, match="out of memory on cpu even with one image per batch"):
        handle.logits(torch.rand(3, 3, 2, 2))
