"""What the papers' CIFAR networks share: normalisation choices, He initialisation, the SGD
training recipe with crop-and-flip augmentation (ODIN section 4.1; the feature-GMM paper's
appendix C), used by ``densenet.py`` and ``wide_resnet.py``, and semi-supervised temporal
ensembling (Laine & Aila 2017) for the feature-GMM paper's TE-WRN-28.
"""
from __future__ import annotations

import math
from typing import Callable

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from oodbench.api import UNLABELED, ImageSet, PluginError, atomic_write

#: ``normalisation`` option -> (mean, std) per RGB channel; ``none`` is the identity.
NORMALISATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    # CIFAR-10 training-set statistics, as cifar-resnet uses them.
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # The rounded values in ODIN's and Lee et al.'s code (transforms.Normalize), what their checkpoints expect.
    "odin": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "none": None,
}


def normalisation_stats(plugin: str, normalisation: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for ``normalisation`` and images with ``channels`` channels."""
    stats = NORMALISATIONS[normalisation]
    if stats is None:
        return (0.0,) * channels, (1.0,) * channels
    if channels != 3:
        raise PluginError(f"{plugin} normalisation '{normalisation}' is for RGB images, got {channels} channel(s); "
                          "use normalisation = \"none\" for other images")
    return stats


def check_normalisation(plugin: str, normalisation: str) -> None:
    if normalisation not in NORMALISATIONS:
        raise PluginError(f"{plugin} normalisation must be one of {', '.join(NORMALISATIONS)}, not '{normalisation}'")


def he_init(network: nn.Module) -> None:
    """The authors' initialisation (ODIN's and Lee et al.'s DenseNet3/WideResNet code).

    Convolutions N(0, 2 / (k * k * out_channels)) (He et al. 2015, fan-out); batch norm
    weight 1, bias 0; linear bias 0 (linear weight keeps PyTorch's default uniform init).
    """
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
            module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.data.fill_(1)
            module.bias.data.zero_()
        elif isinstance(module, nn.Linear):
            module.bias.data.zero_()


def step_lr(epoch: int, epochs: int, lr: float, milestones_percent: tuple[int, ...], gamma: float) -> float:
    """Learning rate of 0-based ``epoch``: ``lr`` times ``gamma`` per milestone reached.

    A milestone at p% of ``epochs`` starts at epoch ``max(1, epochs * p // 100)``: 300 epochs
    with (50, 75) give epochs 150 and 225 as in Huang et al.'s code; 200 with (30, 60, 80) give
    60, 120, 160 as in Zagoruyko & Komodakis.
    """
    return lr * gamma ** sum(epoch >= max(1, epochs * p // 100) for p in milestones_percent)


def step_lr_at_epochs(epoch: int, lr: float, milestone_epochs: tuple[int, ...], gamma: float) -> float:
    """Learning rate of 0-based ``epoch``: ``lr`` times ``gamma`` per milestone epoch reached (the
    feature-GMM paper's "divided by 10 at epoch 150 and 175": epochs 0-149 at lr, 150-174 at lr/10)."""
    return lr * gamma ** sum(epoch >= m for m in milestone_epochs)


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     mode: str = "constant", flip: bool = True) -> torch.Tensor:
    """Pad by ``padding`` pixels (zeros, or ``reflect``), take a random crop of the original size, flip half.

    Per-image offsets and flips are drawn from ``generator``, so a seed fixes the augmentation.
    ``flip = False`` keeps every image's orientation (the draws are still made).
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4, mode=mode) if padding else x
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = (torch.rand(n, generator=generator) < 0.5) & flip
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def train_sgd(network: nn.Module, train: ImageSet, *, seed: int, device: torch.device,
              progress: Callable[[str], None], epochs: int, batch_size: int, lr: float, weight_decay: float,
              milestones_percent: tuple[int, ...], gamma: float, padding_mode: str,
              resume_dir: Path | None = None, milestone_epochs: tuple[int, ...] = ()) -> None:
    """The CIFAR recipe both papers' networks share, in place, then ``network.eval()``.

    SGD with Nesterov momentum 0.9 and weight decay (L2 on every parameter, as in the papers'
    code), cross-entropy, ``epochs`` passes over ``train`` in shuffled mini-batches, learning
    rate from ``step_lr`` (or, given ``milestone_epochs``, ``step_lr_at_epochs``) set at the start
    of each epoch, and per batch a random crop after
    4-pixel padding and a random horizontal flip (``random_crop_flip``). Shuffling,
    augmentation and dropout are seeded by ``seed``; on a GPU cuDNN may still make runs differ
    in the last bits. A final batch of a single image is skipped (batch norm needs two).

    With ``resume_dir`` (``Model.resume_dir``), the state after every epoch (weights,
    optimiser, epoch, random generators) is saved there and a restarted training continues
    after the last finished epoch; on a CPU the result is bit-identical to an uninterrupted run.
    """
    torch.manual_seed(seed)  # dropout draws from the global generators
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(train.y, dtype=torch.long)
    network.to(device).train()
    optimiser = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    resumed = _resume(resume_dir, network, optimiser, generator, progress)
    first_epoch = 0 if resumed is None else resumed["epoch"] + 1
    for epoch in range(first_epoch, epochs):
        rate = (step_lr_at_epochs(epoch, lr, milestone_epochs, gamma) if milestone_epochs
                else step_lr(epoch, epochs, lr, milestones_percent, gamma))
        for group in optimiser.param_groups:
            group["lr"] = rate
        order = torch.randperm(len(train), generator=generator)
        total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            if len(batch) < 2:
                continue
            x = random_crop_flip(train.tensor(batch.numpy()), generator, 4, padding_mode).to(device)
            y = labels[batch].to(device)
            logits = network(x)
            loss = F.cross_entropy(logits, y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total_loss += loss.detach() * len(batch)  # summed on the device: one synchronisation per epoch
            correct += (logits.argmax(1) == y).sum()
            seen += len(batch)
        if resume_dir is not None:
            state = {"epoch": epoch, "network": network.state_dict(), "optimiser": optimiser.state_dict(),
                     "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
            atomic_write(Path(resume_dir) / RESUME_FILE, lambda f: torch.save(state, f))
        progress(f"epoch {epoch + 1}/{epochs} lr {rate:g} loss {total_loss.item() / max(seen, 1):.3f} "
                 f"train accuracy {correct.item() / max(seen, 1):.3f}")
    network.eval()


RESUME_FILE = "last-epoch.pt"


def _resume(resume_dir: Path | None, network: nn.Module, optimiser: torch.optim.Optimizer,
            generator: torch.Generator, progress: Callable[[str], None]) -> dict | None:
    """Restore the state saved after the last finished epoch, if any, and return it (else None)."""
    path = None if resume_dir is None else Path(resume_dir) / RESUME_FILE
    if path is None or not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    network.load_state_dict(state["network"])
    optimiser.load_state_dict(state["optimiser"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress(f"resuming after epoch {state['epoch'] + 1} ({path})")
    return state


def train_adam(network: nn.Module, train: ImageSet, *, seed: int, device: torch.device,
               progress: Callable[[str], None], epochs: int, lr: float, batch_size: int) -> None:
    """Adam on cross-entropy, ``epochs`` passes in shuffled mini-batches (seeded), no augmentation; leaves eval mode."""
    generator = torch.Generator().manual_seed(seed)
    x, y = train.tensor(), torch.tensor(train.y)
    network.to(device).train()
    optimiser = torch.optim.Adam(network.parameters(), lr=lr)
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(network(x[batch].to(device)), y[batch].to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        progress(f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
    network.eval()


def rampup(epoch: int, length: int) -> float:
    """Laine & Aila's ramp-up: exp(-5 (1 - epoch / length)^2) for epoch < length, then 1."""
    if epoch >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - epoch / length) ** 2)


def rampdown(epoch: int, epochs: int, length: int) -> float:
    """Laine & Aila's ramp-down over the last ``length`` epochs: exp(-12.5 (d / length)^2), d epochs into it.

    Written as their code has it, exp(-(d / 2)^2 / length); the two agree for length 50.
    """
    into = epoch - (epochs - length)
    if into < 0:
        return 1.0
    return math.exp(-((into * 0.5) ** 2) / length)


def update_ensemble(ensemble: torch.Tensor, predictions: torch.Tensor, momentum: float,
                    epochs_done: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of temporal ensembling: Z <- a Z + (1 - a) z, targets z~ = Z / (1 - a^t).

    ``epochs_done`` = t counts the epochs accumulated into Z, this one included; the division
    removes the bias of Z's zero start, so constant predictions give targets equal to them.
    """
    ensemble = momentum * ensemble + (1.0 - momentum) * predictions
    return ensemble, ensemble / (1.0 - momentum ** epochs_done)


def train_temporal_ensembling(network: nn.Module, train: ImageSet, *, seed: int, device: torch.device,
                              progress: Callable[[str], None], epochs: int, batch_size: int, lr: float,
                              unsupervised_weight: float, ensemble_momentum: float, rampup_epochs: int,
                              rampdown_epochs: int, input_noise: torch.Tensor | float, translation: int,
                              flip: bool, resume_dir: Path | None = None) -> None:
    """Temporal ensembling (Laine & Aila, ICLR 2017, Algorithm 2), in place, then ``network.eval()``.

    ``train.y`` may hold ``UNLABELED``. Per epoch, every training image passes once (shuffled,
    full mini-batches only, as in the authors' code), augmented by a random translation of up
    to ``translation`` pixels (reflection padding), a horizontal flip with probability 1/2 when
    ``flip``, and Gaussian noise of standard deviation ``input_noise`` (a float, or a per-channel
    tensor broadcast over NCHW). The loss of a mini-batch B is

        -1/|B| sum_{i in B, labelled} log z_i[y_i]  +  w(t) 1/(C |B|) sum_{i in B} ||z_i - z~_i||^2

    with z_i the softmax output and z~ the bias-corrected ensemble of earlier epochs'
    outputs (``update_ensemble``, momentum ``ensemble_momentum``; 0.6 in the paper). The
    unsupervised weight is w(t) = rampup(t) * ``unsupervised_weight`` * M / N (M labelled
    images of N), and 0 in the first epoch, when no ensemble exists yet. Adam (beta2 0.999,
    eps 1e-8) with learning rate rampup(t) * rampdown(t) * ``lr`` and beta1 moving from 0.9
    to 0.5 along the ramp-down, as in the authors' ``train.py``.

    Seeded by ``seed`` (order, augmentation, noise, dropout). With ``resume_dir``, the state
    after every epoch (weights, optimiser, ensemble, generators) is saved there and a restarted
    training continues after the last finished epoch.
    """
    if len(train) < batch_size:
        raise PluginError(f"temporal ensembling trains on full mini-batches of {batch_size}, "
                          f"but the training split has only {len(train)} images")
    labels = torch.tensor(train.y, dtype=torch.long)
    labelled = labels != UNLABELED
    if not labelled.any():
        raise PluginError("temporal ensembling needs at least one labelled training image")
    targets_y = torch.where(labelled, labels, torch.zeros_like(labels))
    num_classes = int(train.num_classes or int(labels.max()) + 1)
    weight_max = unsupervised_weight * labelled.sum().item() / len(train)
    noise = torch.as_tensor(input_noise, dtype=torch.float32).to(device)

    torch.manual_seed(seed)  # dropout draws from the global generators
    generator = torch.Generator().manual_seed(seed)
    network.to(device).train()
    optimiser = torch.optim.Adam(network.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    ensemble = torch.zeros(len(train), num_classes)
    targets = torch.zeros(len(train), num_classes)
    resumed = _resume(resume_dir, network, optimiser, generator, progress)
    first_epoch = 0 if resumed is None else resumed["epoch"] + 1
    if resumed is not None:
        ensemble, targets = resumed["ensemble"], resumed["targets"]
    for epoch in range(first_epoch, epochs):
        up, down = rampup(epoch, rampup_epochs), rampdown(epoch, epochs, rampdown_epochs)
        rate = up * down * lr
        for group in optimiser.param_groups:
            group["lr"] = rate
            group["betas"] = (down * 0.9 + (1.0 - down) * 0.5, 0.999)
        weight = 0.0 if epoch == 0 else up * weight_max
        predictions = torch.zeros(len(train), num_classes)
        order = torch.randperm(len(train), generator=generator)
        total_loss, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            x = train.tensor(batch.numpy())
            x = random_crop_flip(x, generator, translation, "reflect", flip) if translation or flip else x
            x = x.to(device) + noise.view(1, -1, 1, 1) * torch.randn(x.shape, generator=generator).to(device)
            y, mask = targets_y[batch].to(device), labelled[batch].to(device)
            logits = network(x)
            probabilities = F.softmax(logits, 1)
            supervised = (F.cross_entropy(logits, y, reduction="none") * mask).mean()
            unsupervised = ((probabilities - targets[batch].to(device)) ** 2).mean()
            loss = supervised + weight * unsupervised
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            predictions[batch] = probabilities.detach().float().cpu()
            total_loss += loss.detach() * len(batch)
            correct += ((logits.argmax(1) == y) & mask).sum()
            seen += int(mask.sum())
        ensemble, targets = update_ensemble(ensemble, predictions, ensemble_momentum, epoch + 1)
        if resume_dir is not None:
            state = {"epoch": epoch, "network": network.state_dict(), "optimiser": optimiser.state_dict(),
                     "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                     "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                     "ensemble": ensemble, "targets": targets}
            atomic_write(Path(resume_dir) / RESUME_FILE, lambda f: torch.save(state, f))
        progress(f"epoch {epoch + 1}/{epochs} lr {rate:.2g} unsupervised weight {weight:.3g} "
                 f"loss {total_loss.item() / (len(order) // batch_size * batch_size):.4f} "
                 f"labelled train accuracy {correct.item() / max(seen, 1):.3f}")
    network.eval()
