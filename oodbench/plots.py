"""Figures of one run folder: ROC and PR curves per failure source, score histograms per detector.

Like Figures 2-5 and 7 of the feature-GMM paper: per source, one ROC and one PR figure with a
line per detector whose legend gives the metric's mean ± std over seeds (from results.csv),
and a grid of histograms, positives against negatives, one panel per detector. Curves and
histograms need the per-input scores of ``scores.npz`` and show one seed, the smallest with
scores for that source; every figure names it.

Figures are built with matplotlib's object API and rendered by Agg, never through pyplot, so
nothing needs a display and no global backend is switched under a caller's feet. Rendering
uses matplotlib's default style, no dates and a fixed SVG id salt: the same run gives
byte-identical files. matplotlib is imported inside functions so the CLI starts fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from .cache import atomic_write
from .leaderboard import SCORES_FILE, ScoreKey, _source_order, read_scores, read_valid_results, summary_frame

FORMATS = ("png", "svg")
DPI = 100
_LINESTYLES = ("-", "--", ":", "-.")
_POSITIVES = {"mistakes": "correctly classified inputs", "ood": "in-distribution test inputs",
              "adversarial": "clean test inputs", "shift": "clean test inputs"}


@dataclass
class RunData:
    """What the plots and the report are drawn from; ``notes`` say why some plots are missing."""

    results: pd.DataFrame  # results.csv as strings, but ``seed`` as int
    scores: dict[ScoreKey, tuple[np.ndarray, np.ndarray]]
    notes: list[str] = field(default_factory=list)


@dataclass
class Plot:
    """One figure of one source, ready to render; ``stem`` is a safe file name without suffix."""

    source: str
    kind: str  # roc | pr | hist
    stem: str
    caption: str
    figure: Any  # matplotlib.figure.Figure

    def render(self, fmt: str) -> bytes:
        buffer = io.BytesIO()
        with _style():
            # PNG carries no date; SVG's would change on every call.
            self.figure.savefig(buffer, format=fmt, dpi=DPI, metadata={"Date": None} if fmt == "svg" else None)
        return buffer.getvalue()


def load_run(run_dir: Path) -> RunData:
    """Read ``results.csv`` (required, checked against the schema) and ``scores.npz`` (optional).

    Raises ``ValueError`` naming the file when results.csv is missing or invalid; a missing or
    unreadable scores.npz only adds a note, since the tables need nothing else.
    """
    run_dir = Path(run_dir)
    path = run_dir / "results.csv"
    results = read_valid_results(path)
    runs = results[["benchmark", "model"]].drop_duplicates()
    if len(runs) > 1:
        raise ValueError(f"{path} holds {len(runs)} (benchmark, model) pairs; a report covers the rows of one run")
    results = results.copy()
    results["seed"] = results["seed"].astype(int)
    ok = results[results["status"] == "ok"]
    keys = list(zip(ok["detector"], ok["source"], ok["seed"]))
    scores_path = run_dir / SCORES_FILE
    notes = []
    scores: dict[ScoreKey, tuple[np.ndarray, np.ndarray]] = {}
    if not scores_path.exists():
        notes.append(f"no {SCORES_FILE} in {run_dir} (the run was written without per-input scores): "
                     "tables only; run again to get the plots")
    else:
        try:
            scores = read_scores(scores_path, keys)
        except ValueError as exc:
            notes.append(f"{exc}: tables only")
        missing = [key for key in keys if key not in scores]
        if scores and missing:
            notes.append(f"{scores_path} lacks the scores of {len(missing)} of {len(keys)} ok rows "
                         f"(first: {'/'.join(map(str, missing[0]))}); those are not drawn")
    return RunData(results, scores, notes)


def safe_name(text: str) -> str:
    """``text`` with each character outside ``[A-Za-z0-9._-]`` replaced by ``_``.

    ``adv:fgsm:0.1:flipped`` -> ``adv_fgsm_0.1_flipped``; '/' and ':' never reach a file name.
    """
    return re.sub(r"[^A-Za-z0-9._-]", "_", text) or "_"


def file_names(sources: list[str]) -> dict[str, str]:
    """A distinct safe name per source; a hash suffix separates names that collide or run long."""
    names: dict[str, str] = {}
    for source in sources:
        name = safe_name(source)
        if len(name) > 80 or name in names.values():
            name = f"{name[:80]}-{hashlib.sha256(source.encode()).hexdigest()[:8]}"
        names[source] = name
    return names


def iter_plots(run: RunData) -> Iterator[Plot]:
    """ROC, PR and histogram figures of every source that has scores, in leaderboard order."""
    if not run.scores:
        return
    summary = summary_frame(run.results).set_index(["detector", "source"])
    results = run.results.set_index(["detector", "source", "seed"])
    detectors = sorted(run.results["detector"].unique())
    styles = {d: (f"C{i % 10}", _LINESTYLES[(i // 10) % len(_LINESTYLES)]) for i, d in enumerate(detectors)}
    sources = sorted({source for _, source, _ in run.scores}, key=_source_order)
    names = file_names(sources)
    n_seeds = run.results["seed"].nunique()

    def legend_title(metric: str) -> str:
        title = f"{metric} mean ± std over {n_seeds} seeds" if n_seeds > 1 else f"{metric} (one seed)"
        return title + ", [bootstrap 95% interval], † fewer than 30 positives or negatives"

    for source in sources:
        seed = min(s for _, src, s in run.scores if src == source)
        pairs = {d: run.scores[(d, source, seed)] for d in detectors if (d, source, seed) in run.scores}
        in_source = set(run.results.loc[run.results["source"] == source, "detector"])
        skipped = [d for d in detectors if d in in_source and d not in pairs]
        row = results.loc[(next(iter(pairs)), source, seed)]
        positives = _POSITIVES.get(str(row["source_kind"]), "positives")
        negatives = str(row["negatives"])
        left_out = f" Not drawn (no scores for seed {seed}): {', '.join(skipped)}." if skipped else ""
        common = (f"Curves of seed {seed}; positives: {positives}, negatives: {negatives}; "
                  "detectors score trusted inputs higher.")
        with _style():
            figures = [
                ("roc", f"ROC curves, {source}. {common} Legend: {legend_title('AUROC')}.{left_out}",
                 _curve_figure("roc", source, seed, pairs, styles, summary, "auroc", legend_title("AUROC"))),
                ("pr", f"Precision-recall curves, {source}, trusted inputs as the positive class. {common} "
                       f"Legend: {legend_title('AUPR-in')}.{left_out}",
                 _curve_figure("pr", source, seed, pairs, styles, summary, "aupr_in", legend_title("AUPR-in"))),
                ("hist", f"Score histograms, {source}, seed {seed}: {positives} (blue) against {negatives} "
                         "(orange), densities over bins shared within each panel; panel titles give that seed's "
                         f"AUROC and two-sided Mann-Whitney U p-value.{left_out}",
                 _histogram_figure(source, seed, pairs, results, positives, negatives)),
            ]
        for kind, caption, figure in figures:
            yield Plot(source, kind, f"{kind}-{names[source]}", caption, figure)


def write_plot(plot: Plot, folder: Path) -> dict[str, bytes]:
    """Write ``plot`` as ``folder/STEM.png`` and ``.svg`` (atomically); return the bytes by format."""
    rendered = {fmt: plot.render(fmt) for fmt in FORMATS}
    for fmt, data in rendered.items():
        atomic_write(Path(folder) / f"{plot.stem}.{fmt}", lambda f, data=data: f.write(data))
    return rendered


@contextlib.contextmanager
def _style() -> Iterator[None]:
    """matplotlib's default style whatever the user's matplotlibrc says, plus reproducible SVG ids."""
    import matplotlib
    import matplotlib.style

    with matplotlib.style.context("default"), matplotlib.rc_context({"svg.hashsalt": "oodbench"}):
        yield


def _labels_scores(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([np.ones(len(pos)), np.zeros(len(neg))]), np.concatenate([pos, neg])


def _legend_value(summary: pd.DataFrame, detector: str, source: str, metric: str) -> str:
    cell = summary.loc[(detector, source)]
    mean, std = cell[f"{metric}_mean"], cell[f"{metric}_std"]
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if cell["n_seeds"] > 1 else "")
    low, high = cell.get(f"{metric}_ci_low"), cell.get(f"{metric}_ci_high")
    if low is not None and not pd.isna(low):
        text += f" [{low:.3f}, {high:.3f}]"
    return text + (" †" if cell.get("small_sample") else "")


def _curve_figure(kind: str, source: str, seed: int, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                  styles: dict[str, tuple[str, str]], summary: pd.DataFrame, metric: str, legend_title: str):
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    figure = Figure(figsize=(7.5, 4.4), layout="constrained")
    ax = figure.add_subplot()
    for detector, (pos, neg) in pairs.items():
        y, s = _labels_scores(pos, neg)
        if kind == "roc":
            x_values, y_values, _ = roc_curve(y, s)
        else:
            precision, recall, _ = precision_recall_curve(y, s)
            x_values, y_values = recall, precision
        color, linestyle = styles[detector]
        ax.plot(x_values, y_values, color=color, linestyle=linestyle, linewidth=1.4,
                label=f"{detector} ({_legend_value(summary, detector, source, metric)})")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.8, linestyle="--", label="chance")
        ax.set(xlabel="False positive rate (failures accepted)", ylabel="True positive rate (trustworthy accepted)")
    else:
        pos, neg = next(iter(pairs.values()))
        ax.axhline(len(pos) / (len(pos) + len(neg)), color="0.6", linewidth=0.8, linestyle="--", label="chance")
        ax.set(xlabel="Recall (trustworthy inputs)", ylabel="Precision")
    name = "ROC" if kind == "roc" else "precision-recall"
    ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{source}: {name} (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title=legend_title, title_fontsize=7,
              frameon=False)
    return figure


def _histogram_figure(source: str, seed: int, pairs: dict[str, tuple[np.ndarray, np.ndarray]],
                      results: pd.DataFrame, positives: str, negatives: str):
    from matplotlib.figure import Figure

    columns = min(4, len(pairs))
    rows = math.ceil(len(pairs) / columns)
    figure = Figure(figsize=(3.1 * columns, 2.5 * rows + 0.7), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (detector, (pos, neg)) in zip(axes, pairs.items()):
        # Shared bins so the two sides of a panel are comparable bar for bar.
        bins = np.histogram_bin_edges(np.concatenate([pos, neg]), bins=40)
        for values, color, label in ((pos, "C0", positives), (neg, "C1", negatives)):
            ax.hist(values, bins=bins, density=True, histtype="stepfilled", alpha=0.55, color=color,
                    label=f"{label} (n={len(values)})")
        row = results.loc[(detector, source, seed)]
        ax.set_title(f"{detector}\nAUROC {float(row['auroc']):.3f}, MWU p {float(row['mannwhitney_p']):.2g}",
                     fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("score", fontsize=7)
    for ax in axes[len(pairs):]:
        ax.set_axis_off()
    # Every panel has the same inputs (one source, one seed), so one legend serves all.
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8,
                  frameon=False)
    figure.suptitle(f"{source}: scores of seed {seed}, higher = more trusted", fontsize=9)
    return figure
