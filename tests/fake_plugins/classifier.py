"""A whole tiny benchmark as a third party would ship it, from ``oodbench.api`` alone: a generated dataset, two
generated failure sets, a two-layer network with a linear head, an attack, four detectors, three failure sources and
a benchmark file (``fake.toml``). A run of it takes well under a second of compute, so the core's tests (plan, tasks, store,
executors, isolation of failing plugins) exercise the whole pipeline without a built-in plugin."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench import hookimpl
from oodbench.api import (Attack, Case, Classifier, Dataset, DatasetContext, Detector, FailureSource, FitContext, ImageRequest, ImageSet,
                          LayeredNetwork, Model, PluginError, Side, SourceContext, SplitView)

BENCHMARK = Path(__file__).with_name("fake.toml")
SPLITS = ("train", "val", "test")


class Stripes(Dataset):
    """Three classes of 8x8 grey images, a bright stripe on noise: horizontal, vertical or diagonal at a random offset.

    ``per_class`` images of each class in each split (default 40: 360 images in all), each split from its own
    seeded stream (``split_seed``), so the split is the same for every run seed; ``label_noise`` of each split's
    labels are redrawn at random, which leaves the classifier some mistakes to detect (it gets about 90% right). uint8 pixels; generated,
    so its fingerprint is ''.
    """

    name = "fake-stripes"
    splits = SPLITS

    def __init__(self, *, per_class: int = 40, noise: float = 0.2, label_noise: float = 0.05, split_seed: int = 0):
        self.per_class, self.noise, self.label_noise, self.split_seed = per_class, noise, label_noise, split_seed

    def load(self, ctx: DatasetContext) -> ImageSet:
        if ctx.split not in SPLITS:
            raise PluginError(f"{self.name} has splits {SPLITS}, not '{ctx.split}'")
        rng = np.random.default_rng([self.split_seed, SPLITS.index(ctx.split)])
        y = np.repeat(np.arange(3), self.per_class)
        x = rng.normal(0.3, self.noise, (len(y), 8, 8))
        offset = rng.integers(0, 8, len(y))
        rows, cols = np.indices((8, 8))
        for i, (label, k) in enumerate(zip(y, offset)):
            stripe = [rows == k, cols == k, (cols - rows) % 8 == k][label]
            x[i][stripe] += 0.8
        flip = rng.random(len(y)) < self.label_noise
        y = np.where(flip, rng.integers(0, 3, len(y)), y)
        pixels = np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)[:, None]
        return ImageSet(pixels, y.astype(np.int64), self.name, 3)


class _Generated(Dataset):
    def __init__(self, *, size: int = 0):
        self.size = size

    def _shape(self, ctx: DatasetContext) -> tuple[int, ...]:
        if ctx.image_shape is None:
            raise PluginError(f"{self.name} is a failure source: it needs the in-distribution image shape")
        return (self.size or ctx.size or 100, *ctx.image_shape)

    def _rng(self, ctx: DatasetContext) -> np.random.Generator:
        return np.random.default_rng([ctx.seed, len(self.name)])


class Blank(_Generated):
    """Flat grey images, one uniform level per image plus a little noise; float32, seeded by the run's seed."""

    name = "fake-blank"

    def load(self, ctx: DatasetContext) -> ImageSet:
        rng, shape = self._rng(ctx), self._shape(ctx)
        x = rng.uniform(0, 1, (shape[0], 1, 1, 1)) + rng.normal(0, 0.02, shape)
        return ImageSet(np.clip(x, 0, 1).astype(np.float32), None, self.name)


class Noise(_Generated):
    """Every pixel uniform in [0, 1]; float32, seeded by the run's seed."""

    name = "fake-noise"

    def load(self, ctx: DatasetContext) -> ImageSet:
        return ImageSet(self._rng(ctx).uniform(0, 1, self._shape(ctx)).astype(np.float32), None, self.name)


class _Network(LayeredNetwork):
    def __init__(self, channels: int, pixels: int, num_classes: int, width: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.hidden = nn.Linear(width * pixels, 16)
        self.linear = nn.Linear(16, num_classes)

    @property
    def head(self) -> nn.Linear:
        return self.linear

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        maps = F.relu(self.conv(x - 0.5))
        features = F.relu(self.hidden(maps.flatten(1)))
        return self.linear(features), features, [maps]


class TinyNet(Model):
    """A 3x3 convolution (``width`` maps), a 16-unit hidden layer (the features) and a linear head.

    Trained from its seeded initialisation by full-batch Adam (lr 0.03, ``epochs`` steps), in a fraction of a second.
    """

    name = "fake-net"

    def __init__(self, *, width: int = 8, epochs: int = 80):
        self.width, self.epochs = width, epochs

    def build(self, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return _Network(image_shape[0], image_shape[1] * image_shape[2], num_classes, self.width)

    def train(self, network: nn.Module, train: ImageSet, val: ImageSet, seed: int, device: torch.device,
              progress: Callable[[str], None]) -> None:
        x, y = train.tensor().to(device), torch.tensor(train.y).to(device)
        network.to(device).train()
        optimiser = torch.optim.Adam(network.parameters(), lr=0.03)
        # On one thread: tensors this small gain nothing from more, and on busy cores waiting for the others costs
        # ~100x the step (the same weights whatever the run's thread count, too).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(self.epochs):
                loss = F.cross_entropy(network(x), y)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
        finally:
            torch.set_num_threads(threads)
        progress(f"loss {loss.item():.3f}")
        network.eval()


class Nudge(Attack):
    """One step of ``eps`` along the sign of the cross-entropy's input gradient (FGSM), clipped to [0, 1]."""

    name = "fake-nudge"

    def perturb(self, model: Classifier, images: torch.Tensor, labels: torch.Tensor, eps: float,
                generator: torch.Generator) -> torch.Tensor:
        grad = model.input_gradient(images, lambda logits, _, y: F.cross_entropy(logits, y, reduction="none"),
                                    targets=labels)
        return (images + eps * grad.sign()).clamp(0, 1)


class _NothingFitted(Detector):
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        pass


class Confidence(_NothingFitted):
    """Max softmax probability of the logits (float64). Fit: nothing."""

    name = "fake-confidence"

    def score(self, view: SplitView) -> np.ndarray:
        logits = view.logits.astype(np.float64)
        logits = logits - logits.max(1, keepdims=True)
        return 1.0 / np.exp(logits).sum(1)


class LayerEnergy(_NothingFitted):
    """Minus the mean of the intermediate layers' channel means: reads ``layers``, so its run extracts them."""

    name = "fake-layers"
    needs = frozenset({"layers"})

    def score(self, view: SplitView) -> np.ndarray:
        return -np.mean([layer.astype(np.float64).mean(1) for layer in view.layers], axis=0)


class Centroid(Detector):
    """Minus the distance of the features to the nearest class mean of the training features: a fitted state."""

    name = "fake-centroid"
    needs = frozenset({"features", "labels"})

    def __init__(self, *, scale: float = 1.0):
        self.scale = scale
        self.means: np.ndarray | None = None

    def fit(self, ctx: FitContext) -> None:
        features, labels = ctx.train.features.astype(np.float64), ctx.train.labels
        self.means = np.stack([features[labels == c].mean(0) for c in np.unique(labels)])

    def score(self, view: SplitView) -> np.ndarray:
        distances = ((view.features.astype(np.float64)[:, None] - self.means[None]) ** 2).sum(2)
        return -self.scale * np.sqrt(distances.min(1))

    def state_dict(self) -> dict[str, Any]:
        return {"means": self.means}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        self.means = np.asarray(state["means"])


class GradientNorm(Detector):
    """Minus the norm of the max logit's input gradient, less its median on the training images: it needs the
    classifier to score, so its stored state loads only with a ``FitContext`` carrying the classifier."""

    name = "fake-gradnorm"
    needs = frozenset({"images", "gradients"})

    def _norms(self, model: Classifier, view: SplitView) -> np.ndarray:
        grad = model.input_gradient(view.images.tensor(), lambda logits, _: logits.max(1).values)
        return grad.flatten(1).norm(dim=1).double().numpy()

    def fit(self, ctx: FitContext) -> None:
        self.model = ctx.model
        self.offset = float(np.median(self._norms(ctx.model, ctx.train)))

    def score(self, view: SplitView) -> np.ndarray:
        return self.offset - self._norms(self.model, view)

    def state_dict(self) -> dict[str, Any]:
        return {"offset": self.offset}

    def load_state_dict(self, state: dict[str, Any], ctx: FitContext | None = None) -> None:
        if ctx is None or ctx.model is None:
            raise PluginError("fake-gradnorm needs the classifier to load its state")
        self.model, self.offset = ctx.model, float(state["offset"])


class Wrong(FailureSource):
    """The classifier's mistakes on the test set: correct predictions are the positives, wrong ones the negatives."""

    name = "fake-wrong"
    kind = "mistakes"

    def cases(self) -> list[Case]:
        return [Case("fake-wrong", "misclassified test inputs")]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        correct = ctx.predictions["test"] == ctx.labels["test"]
        return Side("test", np.flatnonzero(correct)), Side("test", np.flatnonzero(~correct))


class Foreign(FailureSource):
    """Out of distribution: the test set are the positives, ``size`` images of ``dataset`` the negatives."""

    name = "fake-ood"
    kind = "ood"

    def __init__(self, *, dataset: str, size: int = 0):
        self.dataset, self.size = dataset, size
        self.images = f"fake-ood:{dataset}"

    def image_sets(self) -> list[ImageRequest]:
        return [ImageRequest(self.images, dataset=self.dataset, options={"size": self.size} if self.size else {})]

    def cases(self) -> list[Case]:
        return [Case(self.images, f"{self.dataset} images", ("test", self.images))]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        return (Side("test", np.arange(len(ctx.predictions["test"]))),
                Side(self.images, np.arange(len(ctx.predictions[self.images]))))


class Nudged(FailureSource):
    """Attacked: the first ``[sources] attack_subset`` test images are the positives, their fake-nudge versions at
    ``eps`` the negatives, each clean image paired with its attacked one (a holdout takes a pair whole)."""

    name = "fake-adv"
    kind = "adversarial"

    def __init__(self, *, eps: float = 0.1):
        self.eps = eps
        self.images = f"fake-adv:{eps:g}"

    def image_sets(self) -> list[ImageRequest]:
        return [ImageRequest(self.images, attack="fake-nudge", eps=self.eps)]

    def cases(self) -> list[Case]:
        return [Case(self.images, f"fake-nudge at eps {self.eps:g}", ("test", self.images))]

    def carve(self, case: Case, ctx: SourceContext) -> tuple[Side, Side]:
        pairs = np.arange(len(ctx.attack_subset))
        return Side("test", ctx.attack_subset, pairs=pairs), Side(self.images, pairs, pairs=pairs)


class FakeClassifier:
    """Registers the tiny benchmark's plugins through the hooks, as an installed package's entry point would."""

    @hookimpl
    def oodbench_register_datasets(self, register):
        for dataset in (Stripes, Blank, Noise):
            register(dataset)

    @hookimpl
    def oodbench_register_models(self, register):
        register(TinyNet)

    @hookimpl
    def oodbench_register_attacks(self, register):
        register(Nudge)

    @hookimpl
    def oodbench_register_detectors(self, register):
        for detector in (Confidence, LayerEnergy, Centroid, GradientNorm):
            register(detector)

    @hookimpl
    def oodbench_register_sources(self, register):
        for source in (Wrong, Foreign, Nudged):
            register(source)

    @hookimpl
    def oodbench_register_benchmarks(self, register):
        register(BENCHMARK)
