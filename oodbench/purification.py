"""Feature purification: the feature-GMM paper's Appendix B, run on a finished run's classifier and density.

Paper: "Understanding classifier mistakes with generative models" (ICLR 2021 submission),
Appendix B. The penultimate features F_ref of an input are moved towards a low bits-per-dimension
region of the fitted feature density while staying close to where they started,

    F* = argmin_F  BPD(F) + nu ||F - F_ref||^2,      BPD(F) = -log p(F) / (D ln 2),

by plain gradient descent from F = F_ref:  F := F - eta (grad BPD(F) + 2 nu (F - F_ref)),  100
steps; the classifier's final layer then classifies F*. The paper reports the validation and
test accuracy after purification for eta in {0.1, 0.01} and nu in {0, 0.01, 0.1, 1} with GMM-1000
(its Table 4: at most +0.6 points, with new mistakes beside the corrected ones). Here the same
grid runs on every labelled image set of the run (val, test, attacked and shifted sets), and per
failure source we count what the issue tracker asked for: how many of a source's failures
(mistakes, successful attacks) the classifier gets right after purification, and how many of its
trustworthy inputs it now gets wrong.

The density is a detector's ``log_density`` (``oodbench.api.Detector``), so any detector that
offers a differentiable feature density can be used; the core names none. Purified predictions
are cached by content (detector fit, image set, eta, nu, steps), like every other output.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch

from .cache import make_key

#: The paper's grid (Appendix B.2, Table 4) and step count.
PAPER_LEARNING_RATES = (0.1, 0.01)
PAPER_NUS = (0.0, 0.01, 0.1, 1.0)
PAPER_STEPS = 100
#: Rows of purification.csv, in order.
COLUMNS = ("seed", "detector", "lr", "nu", "steps", "scope", "name", "kind", "side", "n", "right_before",
           "right_after", "fixed", "broken", "non_finite", "accuracy_before", "accuracy_after")
#: Purified in chunks of this many rows: rows are independent, so chunking changes no value and bounds memory.
CHUNK = 4096


def purify(features: torch.Tensor, log_density: Callable[[torch.Tensor], torch.Tensor], lr: float, nu: float,
           steps: int = PAPER_STEPS) -> torch.Tensor:
    """F* after ``steps`` of F := F - lr (grad_F BPD(F) + 2 nu (F - F_ref)) from F = F_ref = ``features``.

    BPD(F) = -log p(F) / (D ln 2) per row, ``log_density`` giving log p in nats per row. Rows are
    independent, so the gradient of the summed BPD is each row's own gradient. A row whose
    features leave the finite numbers stays non-finite (the caller counts it as wrong)."""
    reference = features.detach()
    scale = 1.0 / (reference.shape[1] * math.log(2.0))
    current = reference.clone()
    for _ in range(steps):
        current.requires_grad_(True)
        bpd = -log_density(current) * scale
        (gradient,) = torch.autograd.grad(bpd.sum(), current)
        current = (current - lr * (gradient + 2.0 * nu * (current - reference))).detach()
    return current


def purified_predictions(features: np.ndarray, log_density: Callable[[torch.Tensor], torch.Tensor],
                         head: Callable[[torch.Tensor], np.ndarray], dtype: torch.dtype, device: torch.device,
                         lr: float, nu: float, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The head's predicted class of each row's purified features, and whether those features stayed finite."""
    predictions, finite = [], []
    for start in range(0, len(features), CHUNK):
        chunk = torch.tensor(features[start:start + CHUNK], dtype=dtype, device=device)
        purified = purify(chunk, log_density, lr, nu, steps)
        ok = torch.isfinite(purified).all(dim=1)
        logits = head(torch.where(ok[:, None], purified, torch.zeros_like(purified)).float())
        predictions.append(np.asarray(logits).argmax(axis=1))
        finite.append(ok.cpu().numpy())
    if not predictions:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    return np.concatenate(predictions).astype(np.int64), np.concatenate(finite)


@dataclass(frozen=True)
class Setting:
    """One point of the grid."""

    lr: float
    nu: float
    steps: int = PAPER_STEPS


def grid(learning_rates: Iterable[float] = PAPER_LEARNING_RATES, nus: Iterable[float] = PAPER_NUS,
         steps: int = PAPER_STEPS) -> list[Setting]:
    return [Setting(float(lr), float(nu), int(steps)) for lr in learning_rates for nu in nus]


def _counts(before: np.ndarray, after: np.ndarray, labels: np.ndarray, finite: np.ndarray) -> dict[str, float]:
    right_before, right_after = before == labels, (after == labels) & finite
    n = len(labels)
    return {"n": n, "right_before": int(right_before.sum()), "right_after": int(right_after.sum()),
            "fixed": int((~right_before & right_after).sum()), "broken": int((right_before & ~right_after).sum()),
            "non_finite": int((~finite).sum()),
            "accuracy_before": float(right_before.mean()) if n else math.nan,
            "accuracy_after": float(right_after.mean()) if n else math.nan}


def seed_rows(work, spec, settings: list[Setting], say: Callable[[str], None] = lambda _: None) -> list[dict]:
    """purification.csv's rows of one seed (``work``: the seed's ``runner.SeedWork``; ``spec``: the detector).

    Per setting: one row per labelled image set (``scope = "set"``) and, per failure source whose
    sides are both labelled, one row per side (``scope = "source"``: ``side`` is ``failures`` for
    its negatives, ``trustworthy`` for its positives), counted on the inputs its rows evaluate."""
    detector, det_key = work.fitted_detector(spec)
    prepared = work.prepare()
    handle = prepared.handle
    sets = work.labelled_sets()
    probe = detector.log_density(torch.tensor(prepared.val.features[:1]))
    dtype, device = probe.dtype, probe.device
    by_key = {view.key: name for name, (view, _) in sets.items()}
    rows: list[dict] = []
    for setting in settings:
        after: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, (view, labels) in sets.items():
            say(f"purifying {name} ({len(view)} inputs) with lr={setting.lr:g}, nu={setting.nu:g}")

            def compute(view=view) -> dict[str, np.ndarray]:
                predicted, finite = purified_predictions(view.features, detector.log_density, handle.head, dtype,
                                                         device, setting.lr, setting.nu, setting.steps)
                return {"predictions": predicted, "finite": finite}

            arrays = work.cache.arrays(make_key("purified", detector=det_key, view=view.key, lr=setting.lr,
                                                nu=setting.nu, steps=setting.steps), compute)
            predicted, finite = after[name] = (arrays["predictions"], arrays["finite"].astype(bool))
            rows.append({"seed": work.seed, "detector": spec.label, "lr": setting.lr, "nu": setting.nu,
                         "steps": setting.steps, "scope": "set", "name": name, "kind": "", "side": "all",
                         **_counts(view.predictions, predicted, labels, finite)})
        for source in prepared.sources:
            if source.kind == "error":
                continue
            sides = (("trustworthy", source.positives), ("failures", source.negatives))
            names = [by_key.get(part.parent.key) for _, part in sides]
            if None in names:
                continue  # a side without labels in the classifier's classes (an OOD set): nothing to count
            for (side, part), set_name in zip(sides, names):
                labels = sets[set_name][1][part.index]
                predicted, finite = (a[part.index] for a in after[set_name])
                rows.append({"seed": work.seed, "detector": spec.label, "lr": setting.lr, "nu": setting.nu,
                             "steps": setting.steps, "scope": "source", "name": source.name, "kind": source.kind,
                             "side": side, **_counts(part.parent.predictions[part.index], predicted, labels, finite)})
    return rows


def frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=list(COLUMNS))


def density_detectors(registry, detectors: dict[str, tuple[str, dict]]) -> list[str]:
    """The labels of a run's detectors (``run.json`` order) whose plugin offers ``log_density``."""
    return [label for label, (name, _) in detectors.items()
            if name in registry.names("detectors") and registry.get("detectors", name).target.has_log_density()]


def parse_floats(option: str, text: str, lowest: float, inclusive: bool) -> list[float]:
    """A comma-separated list of numbers, each >= (or >) ``lowest``; ValueError naming ``option`` otherwise."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r}: expected comma-separated numbers") from None
    bad = [v for v in values if not math.isfinite(v) or (v < lowest if inclusive else v <= lowest)]
    if not values or bad:
        raise ValueError(f"{option} {text!r}: every value must be a finite number {'>=' if inclusive else '>'} "
                         f"{lowest:g}")
    return values


def summary(table: pd.DataFrame) -> tuple[list[str], list[list], list[list]]:
    """What ``oodbench purify`` prints and the report shows: the paper's Table 4 (val and test accuracy per
    setting, mean over seeds, with the original first) and, at the setting of best mean val accuracy (chosen on
    val, as one would choose it), each source's failures fixed and trustworthy inputs broken (sums over seeds)."""
    sets = table[table["scope"] == "set"]
    accuracy = sets.groupby(["lr", "nu", "name"], sort=False)[["accuracy_before", "accuracy_after"]].mean()
    names = [n for n in ("val", "test") if n in set(sets["name"])]
    original = ["original", "", *(f"{100 * accuracy.xs(n, level='name')['accuracy_before'].iloc[0]:.2f}"
                                   for n in names)]
    setting_rows = [original]
    for (lr, nu), group in sets.groupby(["lr", "nu"], sort=False):
        by_name = group.groupby("name")["accuracy_after"].mean()
        setting_rows.append([f"{lr:g}", f"{nu:g}", *(f"{100 * by_name[n]:.2f}" for n in names)])
    headers = [*SETTING_HEADERS, *(f"{n} accuracy %" for n in names)]
    val = sets[sets["name"] == "val"].groupby(["lr", "nu"], sort=False)["accuracy_after"].mean()
    if val.empty:
        return headers, setting_rows, []
    lr, nu = val.idxmax()
    chosen = table[(table["scope"] == "source") & (table["lr"] == lr) & (table["nu"] == nu)]
    source_rows = []
    for (name, kind, side), group in chosen.groupby(["name", "kind", "side"], sort=False):
        source_rows.append([name, kind, side, f"{lr:g}", f"{nu:g}", int(group["n"].sum()),
                            int(group["right_before"].sum()), int(group["right_after"].sum()),
                            int(group["fixed"].sum()), int(group["broken"].sum())])
    return headers, setting_rows, source_rows


SETTING_HEADERS = ("eta (lr)", "nu")
SOURCE_HEADERS = ("source", "kind", "side", "eta", "nu", "n", "right before", "right after", "fixed", "broken")
