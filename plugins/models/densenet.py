"""DenseNet-BC for 32x32 images (Huang et al. 2017), the network of the ODIN and Mahalanobis papers."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.api import ImageSet, LayeredNetwork, Model, PluginError

from .checkpoints import checkpoint_path, file_sha256, load_checkpoint
from .recipes import check_normalisation, he_init, normalisation_stats, train_sgd

# --------------------------------------------------------------------------------------
# DenseNet-BC. Module names follow the authors' code (ODIN's code/densenet.py, Lee et al.'s
# models/densenet.py: DenseNet3), so their weights load as a state dict without renaming.
# --------------------------------------------------------------------------------------


class _Bottleneck(nn.Module):
    """BN-ReLU-Conv(1x1, 4k)-BN-ReLU-Conv(3x3, k), output concatenated to the input."""

    def __init__(self, inputs: int, growth_rate: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inputs)
        self.conv1 = nn.Conv2d(inputs, 4 * growth_rate, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, 1, 1, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.dropout(self.conv1(F.relu(self.bn1(x))), self.dropout, self.training)
        out = F.dropout(self.conv2(F.relu(self.bn2(out))), self.dropout, self.training)
        return torch.cat([x, out], 1)


class _Basic(nn.Module):
    """BN-ReLU-Conv(3x3, k), output concatenated to the input (DenseNet without bottlenecks)."""

    def __init__(self, inputs: int, growth_rate: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inputs)
        self.conv1 = nn.Conv2d(inputs, growth_rate, 3, 1, 1, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, F.dropout(self.conv1(F.relu(self.bn1(x))), self.dropout, self.training)], 1)


class _Transition(nn.Module):
    """BN-ReLU-Conv(1x1, compressed channels)-AvgPool(2x2)."""

    def __init__(self, inputs: int, outputs: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inputs)
        self.conv1 = nn.Conv2d(inputs, outputs, 1, 1, 0, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(F.dropout(self.conv1(F.relu(self.bn1(x))), self.dropout, self.training), 2)


class _DenseBlock(nn.Module):
    def __init__(self, layers: int, inputs: int, growth_rate: int, bottleneck: bool, dropout: float):
        super().__init__()
        unit = _Bottleneck if bottleneck else _Basic
        self.layer = nn.Sequential(*(unit(inputs + i * growth_rate, growth_rate, dropout) for i in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


#: The activation after the last batch norm, whose global average is the penultimate feature.
LAST_ACTIVATIONS = {"relu": F.relu, "tanh": torch.tanh}


class DenseNetBCNetwork(LayeredNetwork):
    """Stem conv (2k channels), three dense blocks joined by transitions, BN-ReLU (or BN-tanh), global average,
    linear."""

    def __init__(self, depth: int, growth_rate: int, compression: float, bottleneck: bool, dropout: float,
                 channels: int, num_classes: int, mean: tuple, std: tuple, last_activation: str = "relu"):
        super().__init__()
        self.last_activation = LAST_ACTIVATIONS[last_activation]
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        layers = (depth - 4) // (6 if bottleneck else 3)
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(channels, planes, 3, 1, 1, bias=False)
        self.block1 = _DenseBlock(layers, planes, growth_rate, bottleneck, dropout)
        planes += layers * growth_rate
        self.trans1 = _Transition(planes, math.floor(planes * compression), dropout)
        planes = math.floor(planes * compression)
        self.block2 = _DenseBlock(layers, planes, growth_rate, bottleneck, dropout)
        planes += layers * growth_rate
        self.trans2 = _Transition(planes, math.floor(planes * compression), dropout)
        planes = math.floor(planes * compression)
        self.block3 = _DenseBlock(layers, planes, growth_rate, bottleneck, dropout)
        planes += layers * growth_rate
        self.bn1 = nn.BatchNorm2d(planes)
        self.fc = nn.Linear(planes, num_classes)
        he_init(self)

    @property
    def head(self) -> nn.Linear:
        """The final layer, penultimate features -> logits (``oodbench.api.Classifier.head``); stored as ``fc``."""
        return self.fc

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Logits, penultimate features, and Lee et al.'s feature list (``DenseNet3.feature_list``).

        The list: the stem convolution's output, the first and second dense blocks each after
        its transition, and the third dense block after the final BN-ReLU, whose global
        average is the penultimate feature.
        """
        x = (x - self.mean) / self.std
        stem = self.conv1(x)
        first = self.trans1(self.block1(stem))
        second = self.trans2(self.block2(first))
        third = self.last_activation(self.bn1(self.block3(second)))
        features = third.mean((2, 3))
        return self.fc(features), features, [stem, first, second, third]


class DenseNetBC(Model):
    """DenseNet-BC-100 (k = 12) of ODIN and Mahalanobis (Huang et al. 2017), trained or from a checkpoint.

    Paper: G. Huang, Z. Liu, L. van der Maaten, K. Q. Weinberger, "Densely Connected
    Convolutional Networks", CVPR 2017; the CIFAR network of Liang et al. (ODIN, ICLR 2018)
    and Lee et al. (Mahalanobis, NeurIPS 2018).

    Architecture (layer order as in the authors' PyTorch code, ODIN's ``code/densenet.py`` =
    Lee et al.'s ``models/densenet.py``): 3x3 convolution to 2k channels; three dense blocks of
    (depth - 4) / 6 bottleneck units each (BN-ReLU-Conv1x1 to 4k, BN-ReLU-Conv3x3 to k, output
    concatenated to the input); between blocks a transition (BN-ReLU-Conv1x1 to
    floor(compression x channels), 2x2 average pooling); then BN-ReLU, global average pooling
    (the penultimate features: 342-d for the default) and a linear layer. With the defaults
    (depth 100, ``growth_rate`` 12, ``compression`` 0.5, ``bottleneck`` on) and 10 classes:
    769,162 trainable parameters (0.8M as in the papers), 800,032 for 100 classes.
    ``forward_layers`` returns Lee et al.'s feature list: stem conv, block 1 after its
    transition, block 2 after its transition, block 3 after the final BN-ReLU.

    Input: [0, 1] images, normalised inside the network. ``normalisation``: ``cifar``
    (0.4914, 0.4822, 0.4465 / 0.2470, 0.2435, 0.2616, the default), ``odin`` ((125.3, 123.0,
    113.9) / 255 and (63.0, 62.1, 66.7) / 255, the rounded values ODIN's and Lee et al.'s code
    normalise with: use it for their weights) or ``none``. Normalisations other than ``none``
    need RGB images; with ``none`` any channel count works.

    ``checkpoint``: a state dict file (the authors' module names, so a ``DenseNet3``'s
    ``state_dict()`` loads as is), possibly under ``state_dict`` and with ``module.``
    prefixes, read with ``torch.load(weights_only=True)``; relative paths from ``--data-dir``.
    ODIN's and Lee et al.'s released ``.pth`` files are whole pickled models: load them once
    with their code and save ``model.state_dict()``. With a checkpoint nothing trains; the
    file's sha256 is part of the cache key.

    Training recipe without a checkpoint (Huang et al. section 4.2; ODIN section 4.1): SGD
    with Nesterov momentum 0.9, batch size 64, ``epochs`` 300, learning rate 0.1 divided by
    10 at 50% and 75% of the epochs, weight decay 1e-4, no dropout (the paper's setting with
    augmentation), standard augmentation: random 32x32 crop after zero-padding 4 pixels and
    random horizontal flip. Initialisation as in the authors' code (He normal, fan-out).
    Seeded by the run's seed; the validation split is not used (fixed schedule, no early
    stopping), as in the paper, which trains on all 50,000 training images.

    The feature-GMM paper's variant (its Appendix C: "ReLU non-linearities except for the last
    layer where we use a tanh non-linearity to ensure the extracted features are bounded",
    dropout 0.2, the learning rate divided by 10 at epochs 150 and 175 of 300):
    ``last_activation="tanh"``, ``dropout=0.2``, ``lr_drops=(150, 175)``; the benchmark
    ``cifar10-gmm-paper`` trains it. ``last_activation`` changes no weight, so a checkpoint of
    either variant loads into the other (and then gives other features).

    Deviations: the penultimate features are the mean over whatever spatial size the last
    block has (the authors' ``avg_pool2d(8)``, identical for 32x32 inputs), so other image
    sizes work; the stem has 2k channels also without bottlenecks, as in the authors' code
    (the paper's plain DenseNet has 16); the weight decay applies to every parameter,
    as in the authors' code; ReLUs are not in place.
    """

    name = "densenet-bc"

    def __init__(self, *, depth: int = 100, growth_rate: int = 12, compression: float = 0.5, bottleneck: bool = True,
                 dropout: float = 0.0, normalisation: str = "cifar", checkpoint: str = "", epochs: int = 300,
                 batch_size: int = 64, lr: float = 0.1, weight_decay: float = 1e-4,
                 last_activation: Literal["relu", "tanh"] = "relu", lr_drops: tuple[int, ...] = ()):
        per_block = 6 if bottleneck else 3
        if depth < 4 + per_block or (depth - 4) % per_block:
            raise PluginError(f"densenet-bc depth must be 4 + a positive multiple of {per_block} "
                              f"({'with' if bottleneck else 'without'} bottlenecks), not {depth}")
        if growth_rate < 1 or not 0 < compression <= 1 or not 0 <= dropout < 1:
            raise PluginError("densenet-bc needs growth_rate >= 1, 0 < compression <= 1 and 0 <= dropout < 1, "
                              f"got {growth_rate}, {compression}, {dropout}")
        check_normalisation(self.name, normalisation)
        if epochs < 1 or batch_size < 2:
            raise PluginError(f"densenet-bc needs epochs >= 1 and batch_size >= 2, got {epochs} and {batch_size}")
        self.depth, self.growth_rate, self.compression, self.bottleneck = depth, growth_rate, compression, bottleneck
        self.dropout, self.normalisation, self.checkpoint = dropout, normalisation, checkpoint
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        if any(e < 1 for e in lr_drops):
            raise PluginError(f"densenet-bc lr_drops are epochs >= 1, got {lr_drops}")
        self.last_activation, self.lr_drops = last_activation, tuple(sorted(lr_drops))
        self.trainable = not checkpoint

    def fingerprint(self) -> str:
        return file_sha256(self._path()) if self.checkpoint else ""

    def _path(self) -> Path:
        return checkpoint_path(self.name, self.checkpoint, self.data_dir)

    def build(self, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
        mean, std = normalisation_stats(self.name, self.normalisation, image_shape[0])
        torch.manual_seed(seed)
        network = DenseNetBCNetwork(self.depth, self.growth_rate, self.compression, self.bottleneck, self.dropout,
                                    image_shape[0], num_classes, mean, std, self.last_activation)
        if self.checkpoint:
            load_checkpoint(network, self._path(),
                            f"densenet-bc depth {self.depth}, growth rate {self.growth_rate}, compression "
                            f"{self.compression}{'' if self.bottleneck else ', no bottleneck'}, {num_classes} classes")
        return network

    def train(self, network: nn.Module, train: ImageSet, val: ImageSet, seed: int,
              device: torch.device, progress: Callable[[str], None]) -> None:
        train_sgd(network, train, seed=seed, device=device, progress=progress, epochs=self.epochs,
                  batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                  milestones_percent=(50, 75), milestone_epochs=self.lr_drops, gamma=0.1, padding_mode="constant",
                  resume_dir=self.resume_dir)
