"""Which training labels a semi-supervised benchmark keeps (``[in_distribution] labels_per_class``)."""
from __future__ import annotations

import numpy as np

from .api import UNLABELED, PluginError


def keep_labels_per_class(labels: np.ndarray, per_class: int, seed: int, name: str = "training split") -> np.ndarray:
    """``labels`` with all but ``per_class`` labels of each class set to ``UNLABELED``.

    The kept images are the first ``per_class`` of each class in a seeded random order of the
    split, as Laine & Aila's ``prepare_dataset`` (temporal ensembling) chooses them, so one
    seed always keeps the same images and another seed draws others.
    """
    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    short = [f"{c} ({n})" for c, n in zip(classes, counts) if n < per_class]
    if short:
        raise PluginError(f"labels_per_class = {per_class}, but the {name} has fewer images of class(es) "
                          f"{', '.join(short)}")
    order = np.random.default_rng([seed, per_class]).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for c in classes:
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    return np.where(rank < per_class, labels, UNLABELED)
