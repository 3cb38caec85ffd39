"""Built-in datasets, model and attacks on small inputs, each against a known answer."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from oodbench.api import DatasetContext, ImageSet, MissingDataError
from oodbench.classifier import ClassifierHandle
from oodbench.benchmark import BenchmarkError, load_benchmark
from oodbench.plugins import instantiate

CTX = dict(seed=0, data_dir=Path("."))


def load(registry, name, split="test", **kw):
    return instantiate(registry.get("datasets", name), {}, seed=0).load(DatasetContext(split=split, **CTX, **kw))


def test_digits_split_is_fixed_stratified_and_disjoint(registry):
    splits = {s: load(registry, "digits", s) for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1078, 359, 360]
    assert splits["test"].image_shape == (1, 8, 8) and splits["test"].x.max() == 255
    keys = {tuple(map(bytes, s.x)) for s in splits.values() for _ in [0]}
    assert len(keys) == 3
    assert np.bincount(splits["test"].y).min() >= 35  # stratified: every digit ~36 times
    assert load(registry, "digits", "test").key == splits["test"].key  # deterministic


def test_noise_follows_odin_definitions(registry):
    gauss = load(registry, "gaussian", image_shape=(3, 32, 32), size=2000)
    x = gauss.x
    assert x.shape == (2000, 3, 32, 32) and x.dtype == np.float32
    # N(0.5, 1) clipped to [0, 1]: P(x <= 0) = P(z <= -0.5) = 0.3085 lands exactly on 0.
    assert (x == 0).mean() == pytest.approx(0.3085, abs=0.01) and (x == 1).mean() == pytest.approx(0.3085, abs=0.01)
    uni = load(registry, "uniform", image_shape=(1, 8, 8), size=5000).x
    assert uni.min() >= 0 and uni.max() <= 1 and uni.mean() == pytest.approx(0.5, abs=0.01)
    assert not np.array_equal(load(registry, "uniform", image_shape=(1, 8, 8), size=10).x,
                              instantiate(registry.get("datasets", "uniform"), {}, seed=0).load(
                                  DatasetContext(split="test", seed=1, data_dir=Path("."), image_shape=(1, 8, 8), size=10)).x)


def test_flips_mirror_the_test_set(registry):
    test = load(registry, "digits")
    ctx = dict(image_shape=test.image_shape, in_distribution=lambda s: test)
    assert np.array_equal(load(registry, "hflip", **ctx).x, test.x[..., ::-1])
    assert np.array_equal(load(registry, "vflip", **ctx).x, test.x[..., ::-1, :])


def test_natural_patches_take_the_id_format(registry):
    patches = load(registry, "natural-patches", image_shape=(1, 8, 8), size=20)
    assert patches.x.shape == (20, 1, 8, 8) and patches.x.dtype == np.uint8 and patches.x.std() > 5


def test_npz_reads_converts_and_names_missing_files(registry, tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", x=x, y=np.arange(6))
    npz = instantiate(registry.get("datasets", "npz"), {"test": "rgb.npz"})
    as_id = npz.load(DatasetContext(split="test", seed=0, data_dir=tmp_path))
    assert as_id.x.shape == (6, 3, 4, 4) and np.array_equal(as_id.x, x.transpose(0, 3, 1, 2)) and as_id.num_classes == 6
    grey = npz.load(DatasetContext(split="test", seed=0, data_dir=tmp_path, image_shape=(1, 4, 4)))
    luma = np.round(x @ np.array([0.299, 0.587, 0.114]))
    assert np.abs(grey.x[:, 0].astype(float) - luma).max() <= 1
    with pytest.raises(MissingDataError, match=f"not found: {tmp_path / 'nope.npz'}"):
        instantiate(registry.get("datasets", "npz"), {"test": "nope.npz"}).load(DatasetContext(split="test", seed=0, data_dir=tmp_path))


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 3)

    def forward_features(self, x):
        flat = x.flatten(1)
        return self.fc(flat), flat


def test_fgsm_on_a_linear_model_equals_the_closed_form(registry):
    net = Linear()
    handle = ClassifierHandle(net, torch.device("cpu"))
    x = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.25
    y = torch.arange(8) % 3
    adv = instantiate(registry.get("attacks", "fgsm"), {}).perturb(handle, x, y, 0.1, torch.Generator())
    # d CE / dx = W^T (softmax(Wx+b) - onehot(y)), so the step is 0.1 * its sign.
    with torch.no_grad():
        p = torch.softmax(net.fc(x.flatten(1)), 1) - nn.functional.one_hot(y, 3)
        expected = (x.flatten(1) + 0.1 * (p @ net.fc.weight).sign()).clamp(0, 1).view_as(x)
    assert torch.allclose(adv, expected)
    assert handle.passes["other"]["forward_backward"] == 8


def test_bim_and_pgd_stay_in_the_ball_and_succeed_more_with_eps(registry):
    net = Linear()
    handle = ClassifierHandle(net, torch.device("cpu"))
    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = net.fc(x.flatten(1)).argmax(1)  # start from correctly classified inputs
    rates = []
    for name in ("bim", "pgd"):
        attack = instantiate(registry.get("attacks", name), {})
        for eps in (0.02, 0.1, 0.3):
            adv = attack.perturb(handle, x, y, eps, torch.Generator().manual_seed(0))
            assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
            with torch.no_grad():
                rates.append((net.fc(adv.flatten(1)).argmax(1) != y).float().mean().item())
    assert rates[0] < rates[1] < rates[2] and rates[2] > 0.5
    assert rates[3] < rates[4] < rates[5]


def test_small_cnn_exposes_logits_and_features(registry):
    model = instantiate(registry.get("models", "small-cnn"), {"width": 4})
    net = model.build((1, 8, 8), 10, seed=0)
    logits, features = net.forward_features(torch.rand(5, 1, 8, 8))
    assert logits.shape == (5, 10) and features.shape == (5, 16)
    again = model.build((1, 8, 8), 10, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("text, message", [
    ("name = 1", "name: must be a non-empty string"),
    ('name = "x"\nfoo = 1', "foo: unknown key"),
    ('name = "x"\n[in_distribution]\ndataset = "digits"\n[model]\nplugin = "m"\n[[sources.attacks]]\nplugin = "fgsm"\neps = [2]',
     "sources.attacks[0].eps: must be a non-empty list of numbers in (0, 1]"),
    ('name = "x"\n[in_distribution]\ndataset = "digits"\n[model]\nplugin = "m"\n[run]\nseeds = 0', "run.seeds: must be an integer >= 1"),
    ('name = "x"\n[in_distribution]\ndataset = "digits"\n[model]\nplugin = "m"\n[sources]\nood = ["a", "a"]', "duplicate source names"),
    ("name = [", "not valid TOML"),
])
def test_benchmark_files_are_validated_with_clear_errors(tmp_path, text, message):
    path = tmp_path / "b.toml"
    path.write_text(text)
    with pytest.raises(BenchmarkError, match=f"{path}: .*" if message == "not valid TOML" else None) as info:
        load_benchmark(path)
    assert message in str(info.value)


def test_shipped_benchmarks_are_valid(registry):
    for name in registry.names("benchmarks"):
        bench = load_benchmark(registry.get("benchmarks", name).target)
        assert bench.name == name
        registry.get("datasets", bench.in_distribution.plugin)
        registry.get("models", bench.model.plugin)
        for ref in bench.ood:
            registry.get("datasets", ref.dataset)
        for ref in bench.attacks:
            registry.get("attacks", ref.plugin)
