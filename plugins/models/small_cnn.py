"""A small CNN that trains on a CPU in seconds: the offline default benchmark's classifier."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.api import ImageSet, LayeredNetwork, Model

from .checkpoints import checked_sha256, checkpoint_path, load_checkpoint
from .recipes import train_adam


class _Network(LayeredNetwork):
    def __init__(self, channels: int, num_classes: int, width: int, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.linear = nn.Linear(4 * width, num_classes)

    @property
    def head(self) -> nn.Linear:
        """The final layer, penultimate features -> logits (``oodbench.api.Classifier.head``); stored as ``linear``."""
        return self.linear

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        x = (x - self.mean) / self.std
        first = F.relu(self.conv1(x))
        second = F.max_pool2d(F.relu(self.conv2(first)), 2)
        third = F.relu(self.conv3(second))
        features = third.mean((2, 3))  # global average pooling: the penultimate features
        return self.linear(features), features, [first, second, third]


class SmallCNN(Model):
    """3-layer CNN (width w, 2w, 4w; global average pooling; 4w-d features), trained with Adam.

    Normalisation inside the network ((x - 0.5) / 0.5 by default), so inputs are [0, 1]
    pixels. Recipe: Adam (lr 3e-3), cross-entropy, ``epochs`` full passes over the train
    split in shuffled mini-batches of 64, seeded. No augmentation.

    ``weights``: instead of training, load each seed's weights from a file (``builtin:NAME`` for
    the files shipped with oodbench, else a path relative to ``--data-dir``), read with
    ``torch.load(weights_only=True)``: a state dict, or one per seed under ``seeds`` as
    ``oodbench train --seeds N --export FILE`` writes. ``weights_sha256`` pins the file: any
    other content is refused before any work. Why: training is exact only on the same
    hardware (float32 kernels differ between CPUs and thread counts, and the recipe amplifies
    the last bits into different weights), so the default benchmark ships its weights and gives
    the same classifier on every machine.
    """

    name = "small-cnn"

    def __init__(self, *, width: int = 16, epochs: int = 30, lr: float = 3e-3, batch_size: int = 64,
                 mean: float = 0.5, std: float = 0.5, weights: str = "", weights_sha256: str = ""):
        self.width, self.epochs, self.lr, self.batch_size = width, epochs, lr, batch_size
        self.mean, self.std = mean, std
        self.weights, self.weights_sha256 = weights, weights_sha256
        self.trainable = not weights

    def _path(self) -> Path:
        return checkpoint_path(self.name, self.weights, self.data_dir)

    def fingerprint(self) -> str:
        return checked_sha256(self.name, self._path(), self.weights_sha256) if self.weights else ""

    def build(self, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        network = _Network(image_shape[0], num_classes, self.width, self.mean, self.std)
        if self.weights:
            load_checkpoint(network, self._path(), f"small-cnn width {self.width}, {num_classes} classes", seed=seed)
        return network

    def train(self, network: nn.Module, train: ImageSet, val: ImageSet, seed: int,
              device: torch.device, progress: Callable[[str], None]) -> None:
        train_adam(network, train, seed=seed, device=device, progress=progress, epochs=self.epochs, lr=self.lr,
                   batch_size=self.batch_size)
