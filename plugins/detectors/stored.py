"""What the built-in detectors share to write and read their ``state_dict`` (see ``oodbench.api.Detector``).

A state is one flat dict of arrays and JSON values, so a detector made of parts (a network,
a standardiser, several mixtures, ensemble members) nests each part's entries under a key
prefix; networks travel as their torch state dict converted to NumPy arrays, and are
rebuilt from the detector's options and the stored shapes before their weights are loaded.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from oodbench.api import Classifier, FitContext, PluginError


def with_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``state`` with every key prefixed: a part's entries inside its owner's flat state."""
    return {f"{prefix}{key}": value for key, value in state.items()}


def under_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The entries of ``state`` whose key starts with ``prefix``, the prefix removed (``with_prefix`` reversed)."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


def module_arrays(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """A network's parameters and buffers as NumPy arrays of their own dtype (views of CPU tensors, not copies)."""
    return {name: tensor.detach().cpu().numpy() for name, tensor in module.state_dict().items()}


def load_module_arrays(module: torch.nn.Module, arrays: dict[str, np.ndarray]) -> torch.nn.Module:
    """Copy ``module_arrays`` output into ``module`` (built with the same shapes and dtype); every name must match."""
    module.load_state_dict({name: torch.tensor(value) for name, value in arrays.items()}, strict=True)
    return module


def build_unseeded(make: Any) -> Any:
    """``make()`` without advancing the global RNG: a network whose weights are loaded next needs no initialisation."""
    with torch.random.fork_rng(devices=[]):
        return make()


def device_of(ctx: FitContext | None) -> torch.device:
    """Where a loaded detector computes: the fit's device, the CPU without a context."""
    return ctx.device if ctx is not None else torch.device("cpu")


def classifier_of(ctx: FitContext | None, name: str) -> Classifier:
    """The classifier a gradient detector needs after loading: not state, so it comes from the context."""
    if ctx is None or ctx.model is None:
        raise PluginError(f"{name} needs the classifier (FitContext.model) for input gradients: "
                          "pass the FitContext to load_state_dict")
    return ctx.model
