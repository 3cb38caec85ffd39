"""Wide residual networks for 32x32 images (Zagoruyko & Komodakis 2016): WRN-28-10 of the ODIN paper."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.api import ImageSet, LayeredNetwork, Model, PluginError

from .checkpoints import checkpoint_path, file_sha256, load_checkpoint
from .recipes import check_normalisation, he_init, normalisation_stats, train_sgd, train_temporal_ensembling

#: ``schedule`` option -> (milestones in % of the epochs, factor)
SCHEDULES = {"odin": ((50, 75), 0.1), "wrn": ((30, 60, 80), 0.2)}


# Module names follow the authors' code (ODIN's code/wideresnet.py, after Zagoruyko's
# PyTorch port), so their weights load as a state dict without renaming.
class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-Conv3x3-(dropout)-BN-ReLU-Conv3x3, plus the shortcut.

    When the width or stride changes, the shortcut is a 1x1 convolution of the *activated*
    input (``convShortcut``); otherwise it is the input itself.
    """

    def __init__(self, inputs: int, outputs: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inputs)
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.same = inputs == outputs and stride == 1
        self.convShortcut = None if self.same else nn.Conv2d(inputs, outputs, 1, stride, 0, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        shortcut = x if self.same else self.convShortcut(activated)
        out = F.dropout(self.conv1(activated), self.dropout, self.training)
        return self.conv2(F.relu(self.bn2(out))) + shortcut


class _Group(nn.Module):
    def __init__(self, blocks: int, inputs: int, outputs: int, stride: int, dropout: float):
        super().__init__()
        self.layer = nn.Sequential(*(
            _WideBlock(inputs if i == 0 else outputs, outputs, stride if i == 0 else 1, dropout) for i in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNetNetwork(LayeredNetwork):
    """Conv3x3 (16), three groups of (depth - 4) / 6 blocks (16k, 32k, 64k wide; strides 1, 2, 2), BN-ReLU, linear."""

    def __init__(self, depth: int, widen_factor: int, dropout: float, channels: int, num_classes: int,
                 mean: tuple, std: tuple):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        blocks = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = _Group(blocks, widths[0], widths[1], 1, dropout)
        self.block2 = _Group(blocks, widths[1], widths[2], 2, dropout)
        self.block3 = _Group(blocks, widths[2], widths[3], 2, dropout)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        he_init(self)

    @property
    def head(self) -> nn.Linear:
        """The final layer, penultimate features -> logits (``oodbench.api.Classifier.head``); stored as ``fc``."""
        return self.fc

    def forward_layers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Logits, penultimate features, and the stem and group outputs (Lee et al.'s feature list).

        The list: the stem convolution's output, the first and second groups' outputs (the
        residual stream, not yet batch-normalised: the blocks are pre-activation) and the third
        group's output after the final BN-ReLU, whose global average is the penultimate feature.
        """
        x = (x - self.mean) / self.std
        stem = self.conv1(x)
        first = self.block1(stem)
        second = self.block2(first)
        third = F.relu(self.bn1(self.block3(second)))
        features = third.mean((2, 3))
        return self.fc(features), features, [stem, first, second, third]


class WideResNet(Model):
    """WRN-28-10 of ODIN (Zagoruyko & Komodakis 2016), pre-activation blocks, trained or from a checkpoint.

    Paper: S. Zagoruyko, N. Komodakis, "Wide Residual Networks", BMVC 2016; the second CIFAR
    network of Liang et al. (ODIN, ICLR 2018).

    Architecture (layer order as in ODIN's ``code/wideresnet.py``, Zagoruyko's PyTorch port):
    3x3 convolution to 16 channels; three groups of (``depth`` - 4) / 6 pre-activation basic
    blocks (BN-ReLU-Conv3x3, dropout, BN-ReLU-Conv3x3, added to the shortcut; a 1x1
    convolution of the activated input where width or stride change) of widths 16k, 32k, 64k
    (k = ``widen_factor``) and strides 1, 2, 2; BN-ReLU, global average pooling (the
    penultimate features: 64k-d, 640 for the default) and a linear layer. WRN-28-10 for 10
    classes: 36,479,194 trainable parameters (36.5M in the paper), 36,536,884 for 100.
    ``forward_layers`` returns the stem conv, the outputs of groups 1 and 2, and group 3
    after the final BN-ReLU.

    Input: [0, 1] images, normalised inside the network; ``normalisation`` as for
    ``densenet-bc``: ``cifar`` (default), ``odin`` (the rounded values of ODIN's code, for
    its weights) or ``none`` (any channel count).

    ``checkpoint``: a state dict file (the authors' module names, so a ``WideResNet``'s
    ``state_dict()`` from ODIN's code loads as is), possibly under ``state_dict`` and with
    ``module.`` prefixes, read with ``torch.load(weights_only=True)``; relative paths from
    ``--data-dir``. ODIN's released ``.pth`` files are whole pickled models: load them once
    with their code and save ``model.state_dict()``. With a checkpoint nothing trains.

    Training recipe without a checkpoint: SGD with Nesterov momentum 0.9, batch size 128,
    ``epochs`` 200, learning rate 0.1, weight decay 5e-4, ``dropout`` 0.3 between the
    convolutions of each block (the paper's CIFAR setting), random 32x32 crop after padding
    4 pixels by reflection and random horizontal flip (the paper's augmentation).
    ``schedule``: ``odin`` (default) divides the learning rate by 10 at 50% and 75% of the
    epochs, as ODIN section 4.1 states for its networks; ``wrn`` multiplies it by 0.2 at 30%,
    60% and 80% (epochs 60, 120, 160 of 200), the WRN paper's own schedule. Initialisation
    as in the authors' code (He normal, fan-out). Seeded by the run's seed; the validation
    split is not used (fixed schedule, no early stopping).

    Deviations: ODIN trained its WRN-28-10 with dropout 0 (set ``dropout = 0.0`` to match);
    the default schedule is ODIN's, not the WRN paper's (``schedule = "wrn"``); the input is
    normalised by per-channel mean/std (no ZCA whitening); the penultimate features
    are the mean over whatever spatial size the last group has (the authors'
    ``avg_pool2d(8)`` at 32x32); weight decay applies to every parameter as in the authors'
    code; ReLUs are not in place. WRN-28-10 is ~5.2 GFLOPs per 32x32 image: train it on a GPU.
    """

    name = "wide-resnet"

    def __init__(self, *, depth: int = 28, widen_factor: int = 10, dropout: float = 0.3, normalisation: str = "cifar",
                 checkpoint: str = "", epochs: int = 200, batch_size: int = 128, lr: float = 0.1,
                 weight_decay: float = 5e-4, schedule: str = "odin"):
        if depth < 10 or (depth - 4) % 6:
            raise PluginError(f"wide-resnet depth must be 4 + a positive multiple of 6 (10, 16, 22, 28, ...), "
                              f"not {depth}")
        if widen_factor < 1 or not 0 <= dropout < 1:
            raise PluginError(f"wide-resnet needs widen_factor >= 1 and 0 <= dropout < 1, "
                              f"got {widen_factor}, {dropout}")
        check_normalisation(self.name, normalisation)
        if schedule not in SCHEDULES:
            raise PluginError(f"wide-resnet schedule must be one of {', '.join(SCHEDULES)}, not '{schedule}'")
        if epochs < 1 or batch_size < 2:
            raise PluginError(f"wide-resnet needs epochs >= 1 and batch_size >= 2, got {epochs} and {batch_size}")
        self.depth, self.widen_factor, self.dropout = depth, widen_factor, dropout
        self.normalisation, self.checkpoint, self.schedule = normalisation, checkpoint, schedule
        self.epochs, self.batch_size, self.lr, self.weight_decay = epochs, batch_size, lr, weight_decay
        self.trainable = not checkpoint

    def fingerprint(self) -> str:
        return file_sha256(self._path()) if self.checkpoint else ""

    def _path(self) -> Path:
        return checkpoint_path(self.name, self.checkpoint, self.data_dir)

    def build(self, image_shape: tuple[int, int, int], num_classes: int, seed: int) -> nn.Module:
        mean, std = normalisation_stats(self.name, self.normalisation, image_shape[0])
        torch.manual_seed(seed)
        network = WideResNetNetwork(self.depth, self.widen_factor, self.dropout, image_shape[0], num_classes, mean, std)
        if self.checkpoint:
            load_checkpoint(network, self._path(), f"WRN-{self.depth}-{self.widen_factor} ({num_classes} classes)")
        return network

    def train(self, network: nn.Module, train: ImageSet, val: ImageSet, seed: int,
              device: torch.device, progress: Callable[[str], None]) -> None:
        milestones, gamma = SCHEDULES[self.schedule]
        train_sgd(network, train, seed=seed, device=device, progress=progress, epochs=self.epochs,
                  batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                  milestones_percent=milestones, gamma=gamma, padding_mode="reflect", resume_dir=self.resume_dir)


class TemporalEnsemblingWideResNet(WideResNet):
    """WRN-28-10 trained semi-supervised by temporal ensembling: the feature-GMM paper's TE-WRN-28.

    Papers: S. Laine, T. Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017
    (the recipe, ``train_temporal_ensembling`` in ``recipes.py``); the feature-GMM paper
    (appendix C: "we only keep 100 samples per label in the train set. We train a Wide ResNet
    using Temporal Ensembling with a maximum weight decay of 100", read here as Laine & Aila's
    maximum unsupervised weight w_max = 100, their CIFAR-100 value), whose CIFAR-100 TE-WRN-28
    reaches 64.5% test accuracy (its Table 4). Pair it with ``labels_per_class = 100`` in the
    benchmark's ``[in_distribution]`` table (``cifar100-te-wrn``): the network then sees every
    training image, only the kept ones with labels.

    Architecture, ``normalisation`` and ``checkpoint`` as for ``wide-resnet``. Recipe defaults
    are the authors' CIFAR-100 temporal-ensembling configuration (their ``config.py``): 300
    ``epochs``, mini-batches of 100, Adam with maximum ``lr`` 0.003, ramp-up over the first
    80 epochs and ramp-down over the last 50, ensemble momentum 0.6, maximum unsupervised
    weight 100 (scaled by labelled / all images), translation by up to 2 pixels, horizontal
    flips, Gaussian input noise of standard deviation 0.15.

    Deviations: the network is the feature-GMM paper's WRN, not Laine & Aila's 13-layer
    ConvNet with mean-only batch normalisation and weight normalisation; inputs are
    normalised by per-channel mean/std, not ZCA-whitened, and the 0.15 noise is added in that
    normalised space (as the authors add it after whitening), i.e. 0.15 * std per channel in
    [0, 1] pixels; no weight decay (the authors use none).
    """

    name = "wide-resnet-te"
    semi_supervised = True

    def __init__(self, *, depth: int = 28, widen_factor: int = 10, dropout: float = 0.3, normalisation: str = "cifar",
                 checkpoint: str = "", epochs: int = 300, batch_size: int = 100, lr: float = 0.003,
                 unsupervised_weight: float = 100.0, ensemble_momentum: float = 0.6, rampup_epochs: int = 80,
                 rampdown_epochs: int = 50, input_noise: float = 0.15, translation: int = 2, flip: bool = True):
        super().__init__(depth=depth, widen_factor=widen_factor, dropout=dropout, normalisation=normalisation,
                         checkpoint=checkpoint, epochs=epochs, batch_size=batch_size, lr=lr)
        if not 0 <= ensemble_momentum < 1:
            raise PluginError(f"{self.name} ensemble_momentum must be in [0, 1), not {ensemble_momentum}")
        if min(unsupervised_weight, input_noise, lr) < 0 or min(rampup_epochs, rampdown_epochs, translation) < 0:
            raise PluginError(f"{self.name}: lr, unsupervised_weight, input_noise, rampup_epochs, rampdown_epochs "
                              "and translation must be >= 0")
        if rampdown_epochs > epochs:
            raise PluginError(f"{self.name} rampdown_epochs ({rampdown_epochs}) exceeds epochs ({epochs})")
        self.unsupervised_weight, self.ensemble_momentum = unsupervised_weight, ensemble_momentum
        self.rampup_epochs, self.rampdown_epochs = rampup_epochs, rampdown_epochs
        self.input_noise, self.translation, self.flip = input_noise, translation, flip

    def train(self, network: nn.Module, train: ImageSet, val: ImageSet, seed: int,
              device: torch.device, progress: Callable[[str], None]) -> None:
        train_temporal_ensembling(
            network, train, seed=seed, device=device, progress=progress, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, unsupervised_weight=self.unsupervised_weight,
            ensemble_momentum=self.ensemble_momentum, rampup_epochs=self.rampup_epochs,
            rampdown_epochs=self.rampdown_epochs, input_noise=self.input_noise * network.std.flatten(),
            translation=self.translation, flip=self.flip, resume_dir=self.resume_dir)
