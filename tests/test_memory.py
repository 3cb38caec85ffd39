"""Fitted batch sizes: bytes per image against closed forms, available memory, and the handle using them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from oodbench import memory
from oodbench.classifier import ClassifierHandle

ROOT = Path(__file__).resolve().parents[1]


class ConvNet(torch.nn.Module):
    """conv 3->8 (3x3, same padding), ReLU, linear: every live tensor's size is known."""

    def __init__(self, side: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.linear = torch.nn.Linear(8 * side * side, 5)

    def forward_features(self, x):
        hidden = torch.relu(self.conv(x)).flatten(1)
        return self.linear(hidden), hidden


def test_forward_bytes_per_image_is_the_closed_form():
    """Most alive at once: the input, the convolution's output and the ReLU's, float32 each."""
    net, side = ConvNet(), 16
    with torch.inference_mode():
        per_image = memory.bytes_per_image(lambda n: net.forward_features(torch.zeros(n, 3, side, side)))
    assert per_image == (3 + 8 + 8) * side * side * 4


def test_gradient_bytes_per_image_counts_what_autograd_keeps():
    """A linear map of D inputs: x and d/dx are both alive at the end, plus a few C-sized temporaries."""
    d, classes = 5000, 3
    linear = torch.nn.Linear(d, classes)

    def input_gradient(n):
        x = torch.zeros(n, d, requires_grad=True)
        return torch.autograd.grad(linear(x).logsumexp(1).sum(), x)

    per_image = memory.bytes_per_image(input_gradient)
    assert 2 * d * 4 <= per_image <= 2 * d * 4 + 16 * classes * 4


def test_views_are_counted_once():
    def run(n):
        x = torch.zeros(n, 1000)
        return [x.view(-1), x[:, :10], x.t()]

    assert memory.bytes_per_image(run) == 1000 * 4


@pytest.mark.parametrize("available, expected", [
    (None, 256),                    # platform does not say: as asked
    (10 * 2**30, 256),              # room for 256 images: as asked
    (2 * 1.25 * 100 * 2**20, 64),   # 100 images fit: the power of two below
    (1000, 1),                      # not even one: one at a time (and out-of-memory halving behind it)
])
def test_fit_batch_size(available, expected):
    assert memory.fit_batch_size(256, 2**20, available) == expected


def _fake_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


MEMINFO = "MemTotal:       24684084 kB\nMemFree:        1000 kB\nMemAvailable:   20000000 kB\n"


@pytest.mark.parametrize("files, expected", [
    ({"proc/meminfo": MEMINFO}, 20000000 * 1024),
    ({"proc/meminfo": MEMINFO, "sys/fs/cgroup/memory.max": "8589934592\n",
      "sys/fs/cgroup/memory.current": "1073741824\n"}, 7 * 2**30),  # a container's limit binds
    ({"proc/meminfo": MEMINFO, "sys/fs/cgroup/memory.max": "max\n",
      "sys/fs/cgroup/memory.current": "1073741824\n"}, 20000000 * 1024),
    ({"proc/meminfo": MEMINFO, "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": "5\n"}, 20000000 * 1024),  # cgroup v1's "no limit"
    ({"sys/fs/cgroup/memory/memory.limit_in_bytes": "4294967296\n",
      "sys/fs/cgroup/memory/memory.usage_in_bytes": "1073741824\n"}, 3 * 2**30),
    ({}, None),
])
def test_available_bytes_on_a_cpu(tmp_path, files, expected):
    assert memory.available_bytes(torch.device("cpu"), _fake_root(tmp_path, files)) == expected


class Recording(ConvNet):
    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def forward_features(self, x):
        self.sizes.append(len(x))
        return super().forward_features(x)


def test_the_handle_runs_the_fitted_sizes_and_gets_the_same_outputs():
    images = torch.rand(40, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    objective = lambda logits, features: logits.log_softmax(1)[:, 0]  # noqa: E731
    roomy = ClassifierHandle(Recording(), torch.device("cpu"), batch_size=32)
    assert roomy.fit_batch_sizes((3, 16, 16)) == {"forward": 32, "forward_backward": 32}
    forward, gradient = (3 + 8 + 8) * 256 * 4, roomy.memory["bytes_per_image"]["forward_backward"]
    assert roomy.memory["bytes_per_image"]["forward"] == forward and gradient > forward
    assert roomy.passes["fit-batch-size"] == {"forward": 6, "forward_backward": 6}, "probes are counted passes"
    # a budget for 10 forward images holds fewer forward+backward ones
    tight = ClassifierHandle(Recording(), torch.device("cpu"), batch_size=32)
    available = int(10 * forward * memory.ALLOCATOR_OVERHEAD / memory.BUDGET_FRACTION)
    fitted = tight.fit_batch_sizes((3, 16, 16), available=available)
    assert fitted["forward"] == 8 and fitted["forward_backward"] < 8
    tight.network.sizes.clear()
    assert torch.allclose(tight.logits(images), roomy.logits(images), atol=1e-6)
    assert set(tight.network.sizes) == {8}
    tight.network.sizes.clear()
    assert torch.allclose(tight.input_gradient(images, objective), roomy.input_gradient(images, objective), atol=1e-6)
    assert max(tight.network.sizes) == fitted["forward_backward"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_the_estimate_bounds_the_resident_memory_a_real_pass_adds():
    """DenseNet-BC-100, 32 input gradients in a fresh process: peak RSS grows by no more than the fit allows."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "batch_memory.py"), "--one",
                           "densenet-bc-100", "forward_backward", "32"], capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["safe"], row
    assert row["growth_over_estimate"] > 0.5, f"the estimate is far too pessimistic: {row}"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
def test_peak_resident_memory_of_a_child_is_its_own_not_its_parents():
    """ru_maxrss would report at least this process's 1 GiB in the child and hide its 300 MiB."""
    held = torch.ones(2**28)  # 1 GiB, touched  # noqa: F841 (held while the child runs)
    script = ("import torch; from oodbench.memory import peak_resident_bytes as peak; "
              "before = peak(); x = torch.ones(75 * 2**20); print(peak() - before)")
    grown = int(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 300 * 2**20 <= grown < 340 * 2**20


def test_a_probe_that_fails_keeps_the_asked_sizes_and_says_why(monkeypatch):
    def untraceable(run, sizes=memory.PROBE_SIZES):
        raise RuntimeError("custom op without a Python dispatch rule")

    monkeypatch.setattr(memory, "bytes_per_image", untraceable)
    handle = ClassifierHandle(Recording(), torch.device("cpu"), batch_size=32, fit_batch_size=True)
    images = torch.rand(40, 3, 16, 16)
    assert handle.logits(images).shape == (40, 5)
    assert handle.batch_sizes == {"forward": 32, "forward_backward": 32}
    assert handle.memory == {"probe_failed": "RuntimeError: custom op without a Python dispatch rule"}
    assert handle.network.sizes == [32, 8]

