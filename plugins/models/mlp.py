"""A fully connected classifier: Hendrycks & Gimpel's (and ODIN's) MNIST network."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from oodbench.api import ImageSet, LayeredNetwork, Model, PluginError

from .recipes import train_adam

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class _Network(LayeredNetwork):
    def __init__(self, inputs: int, hidden: int, layers: int, num_classes: int, activation: str, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        sizes = [inputs] + [hidden] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))
        self.activation = ACTIVATIONS[activation]()
        self.linear = nn.Linear(hidden, num_classes)

    @property
    def head(self) -> nn.Linear:
        """The final layer, penultimate features -> logits (``oodbench.api.Classifier.head``); stored as ``linear``."""
        return self.linear

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        h = ((x - self.mean) / self.std).flatten(1)
        outputs = []
        for layer in self.hidden:
            h = self.activation(layer(h))
            outputs.append(h)
        return self.linear(h), h, outputs


class MLP(Model):
    """Fully connected net of Hendrycks & Gimpel's MNIST baseline (ODIN's too): 3 x 256 GELU, Adam, 30 epochs.

    Hendrycks & Gimpel, "A baseline for detecting misclassified and out-of-distribution
    examples", ICLR 2017, as ODIN's appendix describes it: "a three-layer, 256 neuron-wide,
    fully connected network trained for 30 epochs with Adam" (99.34% MNIST test accuracy).
    Read here as ``layers`` = 3 hidden layers of ``hidden`` = 256 units, each followed by the
    ``activation`` (GELU, Hendrycks & Gimpel's nonlinearity; ``relu`` offered), then a linear
    output; the penultimate features are the last hidden layer's activations and
    ``forward_layers`` gives every hidden layer. Inputs are [0, 1] pixels, normalised inside as
    (x - ``mean``) / ``std`` (default 0.5 / 0.5). Recipe: Adam (lr 1e-3), cross-entropy,
    ``epochs`` passes in shuffled mini-batches of 128, seeded; no augmentation, no dropout.
    Deviation: the paper's "three-layer" may count the output layer; ``layers = 2`` gives that reading.
    """

    name = "mlp"

    def __init__(self, *, hidden: int = 256, layers: int = 3, activation: str = "gelu", epochs: int = 30,
                 lr: float = 1e-3, batch_size: int = 128, mean: float = 0.5, std: float = 0.5):
        if activation not in ACTIVATIONS:
            raise PluginError(f"mlp: activation must be one of {sorted(ACTIVATIONS)}, not {activation!r}")
        if layers < 1 or hidden < 1:
            raise PluginError(f"mlp: needs layers >= 1 and hidden >= 1, got layers={layers}, hidden={hidden}")
        self.hidden, self.layers, self.activation = hidden, layers, activation
        self.epochs, self.lr, self.batch_size, self.mean, self.std = epochs, lr, batch_size, mean, std

    def build(self, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        c, h, w = image_shape
        return _Network(c * h * w, self.hidden, self.layers, num_classes, self.activation, self.mean, self.std)

    def train(self, network: nn.Module, train: ImageSet, val: ImageSet, seed: int,
              device: torch.device, progress: Callable[[str], None]) -> None:
        train_adam(network, train, seed=seed, device=device, progress=progress, epochs=self.epochs, lr=self.lr,
                   batch_size=self.batch_size)
