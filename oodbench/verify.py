"""``oodbench leaderboard verify``: re-run a published folder's rows and say which still hold.

A published folder holds what ``oodbench run`` wrote: ``results.csv``, ``run.json`` and a copy
of the benchmark file, ``benchmark.toml``. Verify re-runs the chosen rows from that file (its
sha256 must be the one the rows name) with the detectors and options of ``run.json``, and
compares each metric with the published value.

Tolerances (absolute, on AUROC by default) per kind of failure source, and why:

* ``mistakes``, ``ood`` and ``shift`` (covariate shift: corrupted copies of the test images): 0.005. The classifier's weights are fixed (shipped, hash-checked),
  so only float32 rounding differs between machines: other instruction sets (AVX2 vs AVX-512),
  BLAS libraries, thread counts and batch sizes change the last bits of features and logits,
  which moves a score across a neighbour's only where two scores nearly tie. Measured on the
  digits benchmark (BENCHMARKS.md): at most 2e-4 between AVX-512 and AVX2 kernels.
* ``adversarial``: 0.02. FGSM and BIM step by sign(gradient): a gradient component near zero
  can flip its sign on rounding, which moves that pixel by 2 eps, and BIM compounds it over
  its steps; RobustBench accepts drift for the same reason.
* any other kind a third-party failure source makes: the smallest of these (0.005), or a bare
  ``--tolerance X`` (every kind). ``KIND=X`` takes only the kinds above, so a typo is refused.

Same machine and same packages (constraints/leaderboards.txt) give the same numbers exactly.
"""
from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from .benchmark import Benchmark, load_benchmark
from .leaderboard import BENCHMARK_FILE, FLOAT_FORMAT, read_valid_results

DEFAULT_TOLERANCES: dict[str, float] = {"mistakes": 0.005, "ood": 0.005, "adversarial": 0.02, "shift": 0.005}
FILTER_COLUMNS = ("detector", "source", "seed", "source_kind")
ROW_KEY = ["detector", "source", "seed"]


class VerifyError(ValueError):
    """The folder or the request cannot be verified (exit 2): the message says why."""


@dataclass
class Published:
    """What verify needs of a published folder."""

    folder: Path
    rows: pd.DataFrame  # results.csv as strings, the chosen rows only
    benchmark: Benchmark
    detectors: dict[str, tuple[str, dict[str, Any]]]  # label -> (plugin name, options as asked)


def parse_tolerances(items: list[str] | None) -> dict[str, float]:
    """``["0.01"]`` (every kind) or ``["adversarial=0.03", ...]`` over the defaults."""
    tolerances = dict(DEFAULT_TOLERANCES)
    for item in items or []:
        kind, sep, value = item.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            raise VerifyError(f"--tolerance {item!r}: expected a number or KIND=NUMBER") from None
        if not (math.isfinite(number) and number >= 0):
            raise VerifyError(f"--tolerance {item!r}: must be a finite number >= 0")
        if not sep:
            tolerances = {k: number for k in tolerances}
        elif kind in tolerances:
            tolerances[kind] = number
        else:
            raise VerifyError(f"--tolerance {item!r}: unknown source kind {kind!r}; "
                              f"known: {', '.join(tolerances)}")
    return tolerances


def parse_filters(items: list[str] | None) -> dict[str, str]:
    """``["detector=gmm*", "seed=0"]`` -> {column: glob}; rows must match all."""
    filters: dict[str, str] = {}
    for item in items or []:
        column, sep, pattern = item.partition("=")
        if not sep or column not in FILTER_COLUMNS or not pattern:
            raise VerifyError(f"--rows {item!r}: expected COLUMN=GLOB with COLUMN one of {', '.join(FILTER_COLUMNS)}")
        filters[column] = pattern
    return filters


def load_published(folder: Path, filters: dict[str, str] | None = None) -> Published:
    """The folder's chosen rows, its benchmark file (hash-checked) and its detectors; VerifyError otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VerifyError(f"{folder}: not a folder")
    try:
        rows = read_valid_results(folder / "results.csv")
    except ValueError as exc:
        raise VerifyError(str(exc)) from None
    try:
        run = json.loads((folder / "run.json").read_text())
        detectors = {d["label"]: (d["name"], dict(d.get("options") or {})) for d in run["detectors"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerifyError(f"{folder / 'run.json'}: cannot read the run's detectors ({exc})") from None
    for column, pattern in (filters or {}).items():
        rows = rows[[fnmatch.fnmatchcase(str(v), pattern) for v in rows[column]]]
    if rows.empty:
        raise VerifyError(f"{folder}: no rows match {filters}")
    path = folder / BENCHMARK_FILE
    if not path.is_file():
        raise VerifyError(f"{folder}: no {BENCHMARK_FILE} (the benchmark file a run copies into its folder); "
                          "cannot tell what to re-run")
    benchmark = load_benchmark(path)
    changed = rows[rows["benchmark_sha256"] != benchmark.sha256[:16]]
    if len(changed):
        first = changed.iloc[0]
        raise VerifyError(f"{len(changed)} rows were made with benchmark file {first['benchmark_sha256']}, but "
                          f"{path} is {benchmark.sha256[:16]}: the benchmark changed since publication "
                          f"(first: {first['detector']} / {first['source']} / seed {first['seed']})")
    unknown = sorted(set(rows["detector"]) - set(detectors))
    if unknown:
        raise VerifyError(f"{folder / 'run.json'} does not list the detectors {unknown} of its results.csv")
    return Published(folder, rows, benchmark, detectors)


def compare(published: pd.DataFrame, fresh: pd.DataFrame, tolerances: dict[str, float] | None = None,
            metric: str = "auroc") -> pd.DataFrame:
    """Per published row: the published and new ``metric``, |difference|, tolerance, and whether it holds.

    Both frames hold results.csv rows (strings or numbers). A row holds when both are ``ok`` and
    differ by at most the tolerance of its source kind, or both are ``error``; a row missing from
    ``fresh``, a change of status or of the detector's resolved options fails it.
    """
    tolerances = tolerances or DEFAULT_TOLERANCES
    new = fresh.assign(seed=fresh["seed"].astype(int)).set_index(ROW_KEY)
    out = []
    for record in published.to_dict("records"):
        key = (record["detector"], record["source"], int(record["seed"]))
        tolerance = tolerances.get(str(record["source_kind"]), min(tolerances.values()))
        row = {"detector": key[0], "source": key[1], "seed": key[2], "source_kind": record["source_kind"],
               "published": _number(record[metric]), "new": math.nan, "difference": math.nan,
               "tolerance": tolerance, "holds": False, "why": ""}
        if key not in new.index:
            row["why"] = "not produced by the re-run"
        else:
            again = new.loc[key]
            row["new"] = _number(FLOAT_FORMAT % _number(again[metric]))  # as results.csv would hold it
            if _options(again["detector_options"]) != _options(record["detector_options"]):
                row["why"] = "the detector's resolved options changed"
            elif str(again["status"]) != str(record["status"]):
                row["why"] = f"status {record['status']} became {again['status']}: {again['error'] or ''}".strip()
            elif str(record["status"]) != "ok":
                row["holds"], row["why"] = True, "error both times"
            else:
                row["difference"] = abs(row["new"] - row["published"])
                row["holds"] = bool(row["difference"] <= tolerance)
                if not row["holds"]:
                    row["why"] = f"moved by more than {tolerance:g}"
        out.append(row)
    return pd.DataFrame(out)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _options(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def rerun_specs(published: Published) -> tuple[list[Any], list[int]]:
    """The detectors (as the run asked for them) and seeds that re-make the chosen rows."""
    from .runner import DetectorSpec

    labels = sorted(set(published.rows["detector"]))
    specs = [DetectorSpec(label, *published.detectors[label]) for label in labels]
    seeds = sorted({int(s) for s in published.rows["seed"]})
    return specs, seeds
