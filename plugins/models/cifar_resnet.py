"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-(6n+2) with "option A" shortcuts."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.api import ImageSet, LayeredNetwork, Model, PluginError

from .checkpoints import checkpoint_path, file_sha256, load_checkpoint

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _Block(nn.Module):
    def __init__(self, inputs: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or inputs != planes) else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Option A: parameter-free shortcut, subsample and zero-pad the new channels.
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
        return F.relu(out + shortcut)


class CifarResNetNetwork(LayeredNetwork):
    def __init__(self, blocks: int, channels: int, num_classes: int, mean: tuple, std: tuple):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.conv1 = nn.Conv2d(channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, inputs = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            stage = []
            for i in range(blocks):
                stage.append(_Block(inputs, planes, stride if i == 0 else 1))
                inputs = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)

    @property
    def head(self) -> nn.Linear:
        """The final layer, penultimate features -> logits (``oodbench.api.Classifier.head``); stored as ``linear``."""
        return self.linear

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Logits, penultimate features, and the stem and stage outputs (Lee et al.'s feature list)."""
        x = (x - self.mean) / self.std
        stem = F.relu(self.bn1(self.conv1(x)))
        first = self.layer1(stem)
        second = self.layer2(first)
        third = self.layer3(second)
        features = third.mean((2, 3))
        return self.linear(features), features, [stem, first, second, third]


class CifarResNet(Model):
    """CIFAR ResNet-20/32/44/56/110 (He et al. 2016, option-A shortcuts), from a checkpoint; 64-d features.

    ``checkpoint``: a state dict, or a dict holding one under ``state_dict`` (as
    akamaster/pytorch_resnet_cifar10 saves them), read with ``torch.load(weights_only=True)``
    so no code in the file runs; a ``module.`` prefix (DataParallel) is stripped. Relative
    paths are read from ``--data-dir``. ``normalisation``:
    ``imagenet`` (mean/std of ImageNet, what akamaster's checkpoints were trained with) or
    ``cifar`` (0.4914, 0.4822, 0.4465 / 0.2470, 0.2435, 0.2616). The network normalises its
    [0, 1] input itself. Training from scratch is not offered yet: ``checkpoint`` is required.
    """

    name = "cifar-resnet"
    trainable = False

    def __init__(self, *, depth: str = "resnet20", checkpoint: str = "", normalisation: str = "imagenet"):
        if depth not in DEPTHS:
            raise PluginError(f"cifar-resnet depth must be one of {', '.join(DEPTHS)}, not '{depth}'")
        if normalisation not in ("imagenet", "cifar"):
            raise PluginError(f"cifar-resnet normalisation must be 'imagenet' or 'cifar', not '{normalisation}'")
        if not checkpoint:
            raise PluginError("cifar-resnet needs a 'checkpoint' option (path to the weights)")
        self.depth, self.checkpoint, self.normalisation = depth, checkpoint, normalisation

    def fingerprint(self) -> str:
        return file_sha256(self._path())

    def _path(self) -> Path:
        return checkpoint_path(self.name, self.checkpoint, self.data_dir)

    def build(self, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
        if image_shape[0] != 3:
            raise PluginError(f"cifar-resnet takes RGB images, got {image_shape}")
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if self.normalisation == "imagenet" else (
            (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
        network = CifarResNetNetwork(DEPTHS[self.depth], 3, num_classes, mean, std)
        load_checkpoint(network, self._path(), self.depth)
        return network

    def train(self, network: nn.Module, train: ImageSet, val: ImageSet, seed: int,
              device: torch.device, progress: Callable[[str], None]) -> None:
        raise PluginError("cifar-resnet loads checkpoints; training recipes are not implemented yet")
