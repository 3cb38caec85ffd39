"""The papers' CIFAR networks (densenet-bc, wide-resnet): sizes, outputs, checkpoints, training. CPU, seconds.

The parameter counts and state-dict sizes were computed independently by instantiating the
authors' own classes (ODIN's code/densenet.py and code/wideresnet.py, identical to Lee et
al.'s models/densenet.py): DenseNet3(100, 10) has 769,162 trainable parameters (0.8M in the
papers) and 596 state-dict entries; WideResNet(28, 10, widen_factor=10) has 36,479,194
(36.5M in the WRN paper) and 155 entries.
"""
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from oodbench.api import ImageSet, MissingDataError, PluginError
from oodbench.classifier import ClassifierHandle
from oodbench.benchmark import load_benchmark
from oodbench.cli import parse_detectors
from oodbench.plugins import instantiate
from oodbench.runner import RunOptions, run_benchmark
from oodbench_plugins.models.recipes import random_crop_flip, step_lr

TINY = {"densenet-bc": {"depth": 10, "growth_rate": 4}, "wide-resnet": {"depth": 10, "widen_factor": 1}}


def model(registry, name, **options):
    return instantiate(registry.get("models", name), options)


def trainable_parameters(network):
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def randomise_batch_norm(network, seed=1):
    """Non-trivial running statistics and affine weights, so a checkpoint round trip can fail."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor in (module.running_mean, module.bias.data):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
            for tensor in (module.running_var, module.weight.data):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return network.eval()


@pytest.fixture
def one_thread():
    """Tiny networks: thread synchronisation costs more than it saves, badly so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wrn_28_10(registry):
    return model(registry, "wide-resnet").build((3, 32, 32), 10, 0).eval()


def test_parameter_counts_match_the_authors_code(registry, wrn_28_10):
    densenet = model(registry, "densenet-bc").build((3, 32, 32), 10, 0)
    assert trainable_parameters(densenet) == 769_162
    assert trainable_parameters(model(registry, "densenet-bc").build((3, 32, 32), 100, 0)) == 800_032
    assert trainable_parameters(wrn_28_10) == 36_479_194
    # Same module names as the authors' code, so their state dicts load unchanged (+ our mean/std buffers).
    for network, entries, keys in (
            (densenet, 596, ("block3.layer.15.conv2.weight", "trans2.conv1.weight")),
            (wrn_28_10, 155, ("block1.layer.0.convShortcut.weight", "block3.layer.3.bn2.running_var"))):
        state = network.state_dict()
        assert len(state) == entries + 2 and {"mean", "std", "conv1.weight", "bn1.weight", "fc.bias", *keys} <= set(state)


@pytest.mark.parametrize("name, shapes", [
    ("densenet-bc", [(24, 32, 32), (108, 16, 16), (150, 8, 8), (342, 8, 8)]),
    ("wide-resnet", [(16, 32, 32), (160, 32, 32), (320, 16, 16), (640, 8, 8)]),
])
def test_full_size_outputs_and_layer_list(registry, wrn_28_10, name, shapes):
    network = wrn_28_10 if name == "wide-resnet" else model(registry, name).build((3, 32, 32), 10, 0).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the one forward pass of the 36M-parameter WRN-28-10
        logits, features, maps = network.forward_layers(x)
    assert logits.shape == (2, 10) and features.shape == (2, shapes[-1][0])
    assert [tuple(m.shape) for m in maps] == [(2, *s) for s in shapes]
    # The penultimate feature is the global average of the last block's output, the logits a linear map of it.
    torch.testing.assert_close(features, maps[-1].mean((2, 3)))
    torch.testing.assert_close(logits, F.linear(features, network.fc.weight, network.fc.bias))
    assert (maps[-1] >= 0).all()  # after the final BN-ReLU


@pytest.mark.parametrize("name", TINY)
def test_forward_features_and_forward_agree_with_forward_layers(registry, name):
    network = randomise_batch_norm(model(registry, name, **TINY[name]).build((3, 32, 32), 7, 0))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, features, maps = network.forward_layers(x)
        ff_logits, ff_features = network.forward_features(x)
        plain = network(x)
    assert torch.equal(ff_logits, logits) and torch.equal(ff_features, features) and torch.equal(plain, logits)
    handle = ClassifierHandle(network, torch.device("cpu"))
    assert handle.has_layers and len(handle.outputs_and_layers(x)[2]) == 4


@pytest.mark.parametrize("name", TINY)
def test_normalisation_happens_inside_the_network(registry, name):
    cifar = randomise_batch_norm(model(registry, name, **TINY[name]).build((3, 32, 32), 10, 0))
    none = model(registry, name, normalisation="none", **TINY[name]).build((3, 32, 32), 10, 0).eval()
    none.load_state_dict({**cifar.state_dict(), "mean": none.mean, "std": none.std})
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(cifar(x), none((x - mean) / std))
    grey = model(registry, name, normalisation="none", **TINY[name]).build((1, 16, 16), 10, 0)
    assert grey(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    with pytest.raises(PluginError, match="RGB"):
        model(registry, name, **TINY[name]).build((1, 16, 16), 10, 0)
    with pytest.raises(PluginError, match="normalisation"):
        model(registry, name, normalisation="imagenet")


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip_through_the_plugin(registry, tmp_path, name):
    source = randomise_batch_norm(model(registry, name, **TINY[name]).build((3, 32, 32), 10, 5))
    state = {f"module.{k}": v for k, v in source.state_dict().items() if k not in ("mean", "std")}
    (tmp_path / "weights").mkdir()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "weights" / "net.pt")
    plugin = model(registry, name, checkpoint="weights/net.pt", **TINY[name])
    plugin.data_dir = tmp_path  # relative paths are read from --data-dir
    assert plugin.trainable is False and model(registry, name).trainable is True
    assert plugin.fingerprint() == hashlib.sha256((tmp_path / "weights" / "net.pt").read_bytes()).hexdigest()
    loaded = plugin.build((3, 32, 32), 10, 0).eval()  # a different seed: every weight comes from the file
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))


@pytest.mark.parametrize("name, wrong", [("densenet-bc", {"growth_rate": 6}), ("wide-resnet", {"widen_factor": 2})])
def test_bad_checkpoints_give_errors_naming_the_file(registry, tmp_path, name, wrong):
    other = model(registry, name, **{**TINY[name], **wrong}).build((3, 32, 32), 10, 0)
    torch.save(other.state_dict(), tmp_path / "wrong.pt")
    plugin = model(registry, name, checkpoint=str(tmp_path / "wrong.pt"), **TINY[name])
    with pytest.raises(PluginError, match=re.escape(str(tmp_path / "wrong.pt")) + ": not a .* checkpoint"):
        plugin.build((3, 32, 32), 10, 0)
    torch.save(model(registry, name, **TINY[name]).build((3, 32, 32), 10, 0).state_dict(), tmp_path / "right.pt")
    right = model(registry, name, checkpoint=str(tmp_path / "right.pt"), **TINY[name])
    right.build((3, 32, 32), 10, 0)
    with pytest.raises(PluginError, match="not a .* checkpoint"):  # 10-class weights for a 100-class dataset
        right.build((3, 32, 32), 100, 0)
    torch.save(model(registry, name, **TINY[name]).build((3, 32, 32), 10, 0), tmp_path / "pickled.pt")
    with pytest.raises(PluginError, match=re.escape(str(tmp_path / "pickled.pt")) + ".*state dict"):
        model(registry, name, checkpoint=str(tmp_path / "pickled.pt"), **TINY[name]).build((3, 32, 32), 10, 0)
    missing = model(registry, name, checkpoint="nowhere/net.pt")
    missing.data_dir = tmp_path
    with pytest.raises(MissingDataError, match=re.escape(str(tmp_path / "nowhere" / "net.pt"))):
        missing.fingerprint()


def test_cifar_resnet_keeps_its_messages_on_the_shared_checkpoint_code(registry, tmp_path):
    missing = model(registry, "cifar-resnet", checkpoint="absent.th")
    missing.data_dir = tmp_path
    with pytest.raises(MissingDataError) as info:
        missing.build((3, 32, 32), 10, 0)
    assert str(info.value) == (f"cifar-resnet checkpoint not found: {tmp_path / 'absent.th'} "
                               "(set --data-dir or give an absolute path)")
    torch.save({"state_dict": {"module.conv1.weight": torch.zeros(16, 3, 3, 3)}}, tmp_path / "partial.th")
    with pytest.raises(PluginError) as info:
        model(registry, "cifar-resnet", checkpoint=str(tmp_path / "partial.th")).build((3, 32, 32), 10, 0)
    assert str(info.value) == (f"{tmp_path / 'partial.th'}: not a resnet20 checkpoint: "
                               "Error(s) in loading state_dict for CifarResNetNetwork:")


def test_learning_rate_schedules_are_the_papers():
    # Huang et al. (and ODIN): 0.1, divided by 10 at epochs 150 and 225 of 300.
    assert [step_lr(e, 300, 0.1, (50, 75), 0.1) for e in (0, 149, 150, 224, 225, 299)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # Zagoruyko & Komodakis: 0.1 times 0.2 at epochs 60, 120 and 160 of 200.
    assert [step_lr(e, 200, 0.1, (30, 60, 80), 0.2) for e in (59, 60, 119, 120, 159, 160)] == pytest.approx(
        [0.1, 0.02, 0.02, 0.004, 0.004, 0.0008])
    assert step_lr(0, 1, 0.1, (50, 75), 0.1) == 0.1  # a one-epoch run is not divided from the start


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_augmentation_is_a_padded_crop_maybe_flipped(mode):
    x = torch.rand(6, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(1), 4, mode)
    padded = F.pad(x, (4,) * 4, mode=mode)
    for image, pad in zip(out, padded):
        crops = [pad[:, dy:dy + 9, dx:dx + 9] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(image, c) or torch.equal(image, c.flip(2)) for c in crops)
    assert torch.equal(out, random_crop_flip(x, torch.Generator().manual_seed(1), 4, mode))


def _separable_set(n=48, classes=3, size=16):
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    x = rng.uniform(0, 0.5, (n, 3, size, size)).astype(np.float32)
    x[np.arange(n), y] += 0.5  # the class is the bright channel
    return ImageSet(x, y, "toy", classes)


@pytest.mark.parametrize("name", TINY)
def test_training_is_seeded_and_lowers_the_loss(registry, one_thread, name):
    data = _separable_set()
    plugin = model(registry, name, epochs=4, batch_size=12, lr=0.05, **TINY[name])

    def trained(seed):
        network = plugin.build(data.image_shape, 3, seed)
        messages = []
        plugin.train(network, data, data, seed, torch.device("cpu"), messages.append)
        return network, messages

    first, messages = trained(0)
    again, _ = trained(0)
    other, _ = trained(1)
    assert not first.training  # left in eval mode
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(first.fc.weight, other.fc.weight)
    assert len(messages) == 4 and messages[0].startswith("epoch 1/4 lr 0.05 loss")
    losses = [float(re.search(r"loss (\S+)", m).group(1)) for m in messages]
    assert losses[-1] < losses[0]


class Interrupted(Exception):
    pass


RESUMABLE = {**TINY, "wide-resnet-te": {**TINY["wide-resnet"], "rampup_epochs": 2, "rampdown_epochs": 1}}


@pytest.mark.parametrize("name", RESUMABLE)
def test_interrupted_training_resumes_to_the_same_weights(registry, one_thread, tmp_path, name):
    data = _separable_set()
    plugin = model(registry, name, epochs=3, batch_size=12, lr=0.05, **RESUMABLE[name])

    def stop_after_epoch_2(message):
        if message.startswith("epoch 2/3"):
            raise Interrupted  # as a killed process would, after epoch 2's state was saved

    uninterrupted = plugin.build(data.image_shape, 3, seed=0)
    plugin.train(uninterrupted, data, data, 0, torch.device("cpu"), lambda message: None)
    plugin.resume_dir = tmp_path / "resume"
    with pytest.raises(Interrupted):
        plugin.train(plugin.build(data.image_shape, 3, seed=0), data, data, 0, torch.device("cpu"), stop_after_epoch_2)
    messages = []
    resumed = plugin.build(data.image_shape, 3, seed=0)
    plugin.train(resumed, data, data, 0, torch.device("cpu"), messages.append)
    assert messages[0].startswith("resuming after epoch 2") and len(messages) == 2  # only epoch 3 ran again
    assert all(torch.equal(a, b) for a, b in zip(uninterrupted.state_dict().values(), resumed.state_dict().values()))


def test_densenet_trains_through_the_runner(registry, one_thread, tmp_path):
    (tmp_path / "bench.toml").write_text("""
name = "digits-densenet"
[in_distribution]
dataset = "digits"
[model]
plugin = "densenet-bc"
options = { depth = 10, growth_rate = 8, normalisation = "none", epochs = 3, batch_size = 32 }
[sources]
mistakes = true
ood = ["uniform"]
""")
    opts = RunOptions(benchmark=load_benchmark(tmp_path / "bench.toml"), detectors=parse_detectors("msp,mahalanobis"),
                      seeds=[0], cache_dir=tmp_path / "cache", data_dir=Path("."), device=torch.device("cpu"),
                      progress=False)
    result = run_benchmark(opts, registry)
    assert all(row["status"] == "ok" for row in result.rows), [row.get("error") for row in result.rows]
    scratch = tmp_path / "cache" / "scratch"  # the per-epoch state went there, and is gone once the weights are cached
    assert scratch.is_dir() and not any(scratch.iterdir())
    # Three epochs of a tiny net, with 4-pixel shifts of 8x8 digits: weak (0.26 when written) but above chance.
    assert result.meta["per_seed"][0]["test_accuracy"] > 0.15


def test_the_feature_gmm_papers_densenet_variant(registry, one_thread):
    """Issue 20 item 8: the feature-GMM paper's DenseNet (Appendix C): a tanh last layer keeps every feature in
    (-1, 1) (the mean of tanh values), the ReLU network's features are >= 0 and unbounded; the same weights load
    into both; the learning rate is divided by 10 at epochs 150 and 175."""
    from oodbench_plugins.models.recipes import step_lr_at_epochs

    relu = randomise_batch_norm(model(registry, "densenet-bc", **TINY["densenet-bc"]).build((3, 32, 32), 10, 0))
    tanh = model(registry, "densenet-bc", **TINY["densenet-bc"], last_activation="tanh").build((3, 32, 32), 10, 0)
    tanh.load_state_dict(relu.state_dict())
    tanh.eval()
    images = torch.rand(6, 3, 32, 32) * 50 - 25  # far outside [0, 1]: large activations
    pre = {}
    for name, network in (("relu", relu), ("tanh", tanh)):  # the last batch norm's output, before the activation
        network.bn1.register_forward_hook(lambda module, inputs, output, name=name: pre.__setitem__(name, output))
    with torch.no_grad():
        _, relu_features, _ = relu.forward_layers(images)
        _, tanh_features, _ = tanh.forward_layers(images)
    torch.testing.assert_close(pre["relu"], pre["tanh"])  # one network up to the last activation
    torch.testing.assert_close(tanh_features, torch.tanh(pre["tanh"]).mean((2, 3)))
    torch.testing.assert_close(relu_features, torch.relu(pre["relu"]).mean((2, 3)))
    assert (relu_features >= 0).all() and relu_features.abs().max() > 1 and (tanh_features.abs() <= 1).all()
    assert [step_lr_at_epochs(e, 0.1, (150, 175), 0.1) for e in (0, 149, 150, 174, 175, 299)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    with pytest.raises(Exception, match="last_activation"):
        model(registry, "densenet-bc", last_activation="sigmoid")
