"""Built-in datasets, model and attacks on small inputs, each against a known answer."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from oodbench.api import DatasetContext, ImageSet, MissingDataError
from oodbench.classifier import ClassifierHandle
from oodbench.benchmark import BenchmarkError, load_benchmark
from oodbench.plugins import OptionError, UnknownPluginError, instantiate, resolve_options

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



# -- BIM's step schedules (issue 20 item 12) ----------------------------------------------
def record_iterates(monkeypatch, registry) -> list:
    """Patch the attacks' gradient so that each call records the iterate x_t it is taken at."""
    module = sys.modules[registry.get("attacks", "bim").target.__module__]
    seen, gradient = [], module._gradient

    def recording(model, x, y):
        seen.append(x.detach().clone())
        return gradient(model, x, y)

    monkeypatch.setattr(module, "_gradient", recording)
    return seen


def linear_setup(n=8, seed=1):
    net = Linear()
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.25  # interior: no [0, 1] clip
    return net, ClassifierHandle(net, torch.device("cpu")), x, torch.arange(n) % 3


# Kurakin et al.: min(E + 4, 1.25 E) iterations, E = 255 eps in 0-255 units, integer part, at least one.
@pytest.mark.parametrize("eps, steps", [
    (0.05, 15),      # E = 12.75: min(16.75, 15.9375)
    (0.1, 29),       # E = 25.5: min(29.5, 31.875)
    (0.2, 55),       # E = 51: min(55, 63.75)
    (8 / 255, 10),   # E = 8: min(12, 10)
    (16 / 255, 20),  # E = 16: min(20, 20)
    (2 / 255, 2),    # E = 2: min(6, 2.5)
    (0.01, 3),       # E = 2.55: min(6.55, 3.1875)
    (1 / 255, 1),    # E = 1: min(5, 1.25)
    (0.001, 1),      # E = 0.255: min(4.255, 0.319) floors to 0; one step at least
])
def test_bim_kurakin_schedule_takes_the_papers_step_count(registry, eps, steps):
    net, handle, x, y = linear_setup(n=4)
    attack = instantiate(registry.get("attacks", "bim"), {"schedule": "kurakin"})
    assert attack.schedule_for(eps) == (steps, 1 / 255)
    attack.perturb(handle, x, y, eps, torch.Generator())
    assert handle.passes["other"]["forward_backward"] == steps * 4  # one gradient per step and image


@pytest.mark.parametrize("options, eps, steps, alpha", [
    ({"schedule": "kurakin"}, 0.05, 15, 1 / 255),
    ({}, 0.05, 10, 0.05 / 4),  # the fixed default: 10 steps of eps * 2.5 / 10
    ({"schedule": "fixed", "steps": 4, "step_ratio": 1.0}, 0.1, 4, 0.1 / 4),
])
def test_bim_steps_are_alpha_sized_and_stay_in_the_ball(registry, monkeypatch, options, eps, steps, alpha):
    net, handle, x, y = linear_setup()
    seen = record_iterates(monkeypatch, registry)
    adv = instantiate(registry.get("attacks", "bim"), options).perturb(handle, x, y, eps, torch.Generator())
    assert len(seen) == steps and torch.equal(seen[0], x)
    iterates = seen + [adv]
    for before, after in zip(iterates, iterates[1:]):
        assert (after - before).abs().max() <= alpha + 1e-6  # every pixel moves by at most alpha per step
        assert (after - x).abs().max() <= eps + 1e-6 and after.min() >= 0 and after.max() <= 1
    # The first step is exactly alpha * sign(d CE / dx), with d CE / dx = W^T (softmax(Wx + b) - onehot(y)):
    # alpha < eps and x in [0.25, 0.75], so nothing is clipped yet.
    with torch.no_grad():
        p = torch.softmax(net.fc(x.flatten(1)), 1) - nn.functional.one_hot(y, 3)
        sign = (p @ net.fc.weight).sign().view_as(x)
    assert (sign != 0).all()
    first = iterates[1] - x
    assert torch.allclose(first, alpha * sign, atol=1e-6)
    assert torch.allclose(first.abs(), torch.full_like(x, alpha), atol=1e-6)


def test_bim_kurakin_stays_in_the_ball_and_in_range_near_the_edges(registry):
    net = Linear()
    handle = ClassifierHandle(net, torch.device("cpu"))
    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    x[:20] = x[:20].round()  # some pixels exactly at 0 and 1
    with torch.no_grad():
        y = net.fc(x.flatten(1)).argmax(1)
    attack = instantiate(registry.get("attacks", "bim"), {"schedule": "kurakin"})
    rates = []
    for eps in (0.02, 0.1, 0.3):
        adv = attack.perturb(handle, x, y, eps, torch.Generator())
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
        with torch.no_grad():
            rates.append((net.fc(adv.flatten(1)).argmax(1) != y).float().mean().item())
    assert rates[0] < rates[1] < rates[2]


def old_bim(model, images, labels, eps, steps=10, step_ratio=2.5):
    """BIM as it was before the schedules: the reference the "fixed" schedule must keep reproducing."""
    def loss(logits, _, labels):
        return nn.functional.cross_entropy(logits, labels, reduction="none")

    alpha = eps * step_ratio / steps
    adv = images.clone()
    for _ in range(steps):
        adv = adv + alpha * model.input_gradient(adv, loss, targets=labels).sign()
        adv = torch.min(torch.max(adv, images - eps), images + eps).clamp_(0.0, 1.0)
    return adv


def test_bim_fixed_schedule_is_unchanged(registry):
    net = Linear()
    handle = ClassifierHandle(net, torch.device("cpu"))
    x = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    y = torch.arange(16) % 3
    entry = registry.get("attacks", "bim")
    for eps in (0.02, 0.1):
        expected = old_bim(handle, x, y, eps)
        for options in ({}, {"schedule": "fixed"}, {"steps": 10, "step_ratio": 2.5, "schedule": "fixed"}):
            assert torch.equal(instantiate(entry, options).perturb(handle, x, y, eps, torch.Generator()), expected)
        assert torch.equal(instantiate(entry, {"steps": 3, "step_ratio": 1.5}).perturb(handle, x, y, eps, None),
                           old_bim(handle, x, y, eps, steps=3, step_ratio=1.5))
    # The default options stay what they were, plus the schedule; PGD's are untouched (same cache keys).
    assert resolve_options(entry, {}) == {"steps": 10, "step_ratio": 2.5, "schedule": "fixed"}
    assert resolve_options(registry.get("attacks", "pgd"), {}) == {"steps": 10, "step_ratio": 2.5}


def test_bim_schedule_options_are_validated(registry):
    entry = registry.get("attacks", "bim")
    with pytest.raises(OptionError, match="schedule"):
        resolve_options(entry, {"schedule": "madry"})
    with pytest.raises(OptionError, match="steps"):
        resolve_options(entry, {"steps": 0})
    with pytest.raises(ValueError, match="do not apply"):
        instantiate(entry, {"schedule": "kurakin", "steps": 20})
    with pytest.raises(UnknownPluginError, match="no option schedule"):
        resolve_options(registry.get("attacks", "pgd"), {"schedule": "kurakin"})


def test_paper_benchmarks_use_kurakins_bim_and_digits_keeps_the_fixed_one(registry):
    def bim_options(path):
        (ref,) = [a for a in load_benchmark(path).attacks if a.plugin == "bim"]
        return resolve_options(registry.get("attacks", "bim"), ref.options)["schedule"]

    for name in ("cifar10", "cifar10-wrn", "cifar100", "cifar100-wrn", "cifar100-te-wrn"):
        assert bim_options(registry.get("benchmarks", name).target) == "kurakin", name
    for name in ("digits", "digits-train"):  # published numbers: unchanged
        assert bim_options(registry.get("benchmarks", name).target) == "fixed", name
    assert bim_options(Path(__file__).resolve().parents[2] / "examples" / "cifar10-resnet20-npz.toml") == "fixed"

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
