"""An oodbench detector shipped as its own package: the energy score.

Installed with ``pip install examples/oodbench-energy``, it is found through the ``oodbench``
entry-point group like any third-party plugin: ``oodbench run --detectors energy-example,msp``.
oodbench has a built-in ``energy`` since; this example keeps its own name, because a name
registered twice keeps its first provider (and ``oodbench list`` warns).
"""
from __future__ import annotations

import numpy as np
from scipy.special import logsumexp

import oodbench
from oodbench.api import Detector, SplitView


class Energy(Detector):
    """Negative free energy of the logits (Liu, Wang, Owens & Li, NeurIPS 2020).

    score(x) = -E(x; f) = T * logsumexp_c(f_c(x) / T); higher = more trustworthy (the paper
    flags inputs with high energy). Needs: logits. Default T = 1, the paper's choice.
    """

    name = "energy-example"

    def __init__(self, *, temperature: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"energy: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def score(self, view: SplitView) -> np.ndarray:
        return self.temperature * logsumexp(view.logits.astype(np.float64) / self.temperature, axis=1)


@oodbench.hookimpl
def oodbench_register_detectors(register):
    register(Energy)
