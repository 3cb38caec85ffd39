"""Leaderboard files: the long results CSV, its per-seed aggregate, and terminal tables.

``results.csv`` has one row per (benchmark, model, detector, source, seed) with the columns
of ``RESULT_COLUMNS`` in that order, sorted by those keys, so diffs read well. It holds no
timings or dates: the same command gives the same file. ``summary.csv`` has mean, std and
``n_seeds`` of every metric per (benchmark, model, detector, source) over the ok rows.
``scores.npz`` keeps the per-input scores behind the ok rows, for plots; it is a per-run
artefact, not part of the published schema.
"""
from __future__ import annotations

import csv
import io
import json
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from tabulate import tabulate

from .cache import atomic_write
from .metrics import METRICS

KEY_COLUMNS = ["benchmark", "model", "detector", "source", "seed"]
RESULT_COLUMNS = [
    "schema_version", *KEY_COLUMNS, "status", "error",
    *METRICS, "n_pos", "n_neg", "n_holdout",
    "source_kind", "negatives", "tuned_on_source", "tuned_params",
    "detector_plugin", "detector_version", "detector_options",
    "benchmark_sha256", "model_weights", "device", "oodbench_version",
]
#: The schema ``results_frame`` writes; ``validate_frame`` also reads the versions before it.
SCHEMA_VERSION = 2
#: Columns each schema version added, which files of an earlier version do not have.
ADDED_IN = {"model_weights": 2}
SUMMARY_KEYS = ["benchmark", "model", "detector", "source"]
SCORES_FILE = "scores.npz"
#: How CSV files write floats: 6 significant digits, so files diff well and read back the same everywhere.
FLOAT_FORMAT = "%.6g"
BENCHMARK_FILE = "benchmark.toml"
ScoreKey = tuple[str, str, int]  # (detector, source, seed)


def results_frame(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows))
    for column in RESULT_COLUMNS:
        if column not in frame:
            frame[column] = pd.Series(dtype=object)
    frame = frame[RESULT_COLUMNS]
    return frame.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)


def summary_frame(results: pd.DataFrame) -> pd.DataFrame:
    results = results.copy()
    for metric in METRICS:
        results[metric] = pd.to_numeric(results[metric], errors="coerce")
    ok = results[results["status"] == "ok"]
    rows = []
    for keys, group in results.groupby(SUMMARY_KEYS, sort=True):
        good = ok.loc[ok.index.intersection(group.index)]
        row = dict(zip(SUMMARY_KEYS, keys))
        row["n_seeds"] = len(good)
        row["n_errors"] = len(group) - len(good)
        for metric in METRICS:
            values = good[metric].astype(float)
            row[f"{metric}_mean"] = values.mean() if len(values) else float("nan")
            row[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else (0.0 if len(values) else float("nan"))
        rows.append(row)
    return pd.DataFrame(rows)


def _csv_text(frame: pd.DataFrame) -> str:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    return buffer.getvalue()


def write_run(out_dir: Path, rows: list[dict], timings: list[dict], meta: dict,
              scores: dict[ScoreKey, tuple[np.ndarray, np.ndarray]] | None = None,
              benchmark_file: Path | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, timings.csv, run.json and scores.npz atomically; return their paths.

    Without ``scores`` no scores.npz is written and one left in ``out_dir`` by an earlier run is
    removed, since it would describe other rows than the new results.csv. ``benchmark_file`` is
    copied as ``benchmark.toml``, so the folder alone says what to re-run (``leaderboard verify``).
    """
    out_dir = Path(out_dir)
    results = results_frame(rows)
    files = {
        "results": out_dir / "results.csv",
        "summary": out_dir / "summary.csv",
        "timings": out_dir / "timings.csv",
        "run": out_dir / "run.json",
    }
    atomic_write(files["results"], lambda f: f.write(_csv_text(results)), mode="w")
    atomic_write(files["summary"], lambda f: f.write(_csv_text(summary_frame(results))), mode="w")
    timing_frame = pd.DataFrame(timings, columns=["detector", "source", "seed", "fit_seconds", "score_seconds"])
    atomic_write(files["timings"], lambda f: f.write(_csv_text(timing_frame)), mode="w")
    tracebacks = [{k: r[k] for k in ("detector", "source", "seed", "traceback")} for r in rows if r.get("traceback")]
    atomic_write(files["run"], lambda f: json.dump({**meta, "tracebacks": tracebacks}, f, indent=2, sort_keys=True), mode="w")
    if benchmark_file is not None:
        files["benchmark"] = out_dir / BENCHMARK_FILE
        content = Path(benchmark_file).read_bytes()
        atomic_write(files["benchmark"], lambda f: f.write(content))
    if scores is None:
        (out_dir / SCORES_FILE).unlink(missing_ok=True)
    else:
        files["scores"] = out_dir / SCORES_FILE
        write_scores(files["scores"], scores)
    return files


def scores_key(detector: str, source: str, seed: int, side: str) -> str:
    """The scores.npz member of one side (``pos`` or ``neg``) of one row: ``detector|source|seed|side``."""
    return f"{detector}|{source}|{int(seed)}|{side}"


def write_scores(path: Path, scores: dict[ScoreKey, tuple[np.ndarray, np.ndarray]]) -> None:
    """Store every row's positive and negative scores as float64 members of one compressed npz.

    float64 because the metrics were computed from exactly these values: float32 could merge
    near-equal scores into ties and change an AUROC. Scores that came from float32 have zero low
    mantissa bits, which compress well. Members are sorted and stamped with a fixed date
    (``np.savez_compressed`` stamps the current time), so the same run gives the same bytes.
    """
    arrays = {}
    by_key = sorted(scores.items(), key=lambda item: (item[0][0], item[0][1], int(item[0][2])))
    for (detector, source, seed), (pos, neg) in by_key:
        arrays[scores_key(detector, source, seed, "pos")] = np.asarray(pos, np.float64)
        arrays[scores_key(detector, source, seed, "neg")] = np.asarray(neg, np.float64)
    atomic_write(Path(path), lambda f: _write_npz(f, arrays))


def _write_npz(file, arrays: dict[str, np.ndarray]) -> None:
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, array, allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, member.getvalue())


def read_scores(path: Path, keys: Iterable[ScoreKey]) -> dict[ScoreKey, tuple[np.ndarray, np.ndarray]]:
    """The (positives, negatives) scores of each asked (detector, source, seed) that ``path`` holds.

    Members are looked up by name rather than parsed, so '|' inside a detector's options cannot
    confuse the key. Raises ``ValueError`` naming the file when it cannot be read or a member is
    not a non-empty 1-D array of finite numbers.
    """
    names = {key: (scores_key(*key, "pos"), scores_key(*key, "neg")) for key in keys}
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy file gives a plain array
            raise ValueError("not an npz archive")
        with data:
            members = set(data.files)
            loaded = {name: data[name] for pair in names.values() if set(pair) <= members for name in pair}
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable npz file: {exc or type(exc).__name__}") from None
    for name, values in loaded.items():
        if values.ndim != 1 or not len(values) or values.dtype.kind not in "iuf" or not np.isfinite(values).all():
            raise ValueError(f"{path}: member {name!r} is not a non-empty 1-D array of finite numbers")
    return {(detector, source, int(seed)): (loaded[pos].astype(np.float64), loaded[neg].astype(np.float64))
            for (detector, source, seed), (pos, neg) in names.items() if pos in loaded}


def pivot_cells(results: pd.DataFrame, metric: str = "auroc", number: str = "{:.3f}"
                ) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[str, bool]]]:
    """Sources (display order), detectors, and per (source, detector) the text and whether it is best.

    The text is ``metric`` as mean ± std over seeds (the mean alone with one seed), each number
    formatted with ``number``, or ``error`` when no seed of that cell succeeded. Best is the
    highest mean of the source, the lowest for metrics where lower is better.
    """
    summary = summary_frame(results)
    if summary.empty:
        return [], [], {}
    higher_is_better = metric not in ("fpr_at_95tpr", "detection_error", "mannwhitney_p")
    sources = sorted(summary["source"].unique(), key=_source_order)
    detectors = sorted(summary["detector"].unique())
    best = {}
    for source in sources:
        column = summary[summary["source"] == source].set_index("detector")[f"{metric}_mean"].dropna()
        if len(column):
            best[source] = column.max() if higher_is_better else column.min()
    cells = {}
    for detector in detectors:
        for source in sources:
            cell = summary[(summary["source"] == source) & (summary["detector"] == detector)]
            if cell.empty or cell.iloc[0]["n_seeds"] == 0:
                cells[source, detector] = ("error", False)
                continue
            mean, std, n = cell.iloc[0][f"{metric}_mean"], cell.iloc[0][f"{metric}_std"], cell.iloc[0]["n_seeds"]
            text = number.format(mean) + (f" ± {number.format(std)}" if n > 1 else "")
            cells[source, detector] = (text, bool(source in best and mean == best[source]))
    return sources, detectors, cells


def pivot_table(results: pd.DataFrame, metric: str = "auroc", fmt: str = "github") -> str:
    """Detectors x sources, ``metric`` as mean ± std over seeds; best per source in bold/starred."""
    sources, detectors, cells = pivot_cells(results, metric)
    if not sources:
        return "(no results)"
    mark = "**" if fmt in ("github", "markdown") else "*"

    def shown(text: str, best: bool) -> str:
        if not best:
            return text
        return f"{mark}{text}{mark}" if fmt in ("github", "markdown") else text + mark

    transposed = [["source", *detectors]] + [[s, *(shown(*cells[s, d]) for d in detectors)] for s in sources]
    if fmt == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(transposed)
        return buffer.getvalue().rstrip("\n")
    return tabulate(transposed[1:], headers=transposed[0], tablefmt="github" if fmt == "markdown" else fmt,
                    disable_numparse=True)


def _source_order(source: str) -> tuple[int, str]:
    kind = source.split(":", 1)[0]
    return ({"mistakes": 0, "adv": 1, "ood": 2}.get(kind, 3), source)


# --------------------------------------------------------------------------------------
# Validation and merging of published files
# --------------------------------------------------------------------------------------
_INT_COLUMNS = ("schema_version", "seed", "n_pos", "n_neg", "n_holdout")
_SOURCE_PATTERN = r"^(mistakes|ood:[^:\s]+|adv:[^:\s]+:[0-9.eE+-]+:(flipped|all))$"
_PROVENANCE = ("detector_plugin", "detector_version", "detector_options", "benchmark_sha256", "model_weights",
               "oodbench_version")
MAX_PROBLEMS = 200


def read_results(path: Path) -> pd.DataFrame:
    """A results CSV as strings (no type guessing), or ``ValueError`` saying why it cannot be read."""
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8", engine="python",
                           on_bad_lines="error")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file, expected a header row") from None
    except (pd.errors.ParserError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{path}: not a readable CSV: {reason}") from None


def validate_frame(frame: pd.DataFrame, name: str = "results.csv") -> list[str]:
    """Every problem of a results table, as ``file:row N: column: problem`` (row 2 = first data row)."""
    problems: list[str] = []
    versions = set(frame["schema_version"].astype(str).str.strip()) if "schema_version" in frame.columns else set()
    oldest = min((int(v) for v in versions if v.isdigit()), default=SCHEMA_VERSION)
    missing = [c for c in RESULT_COLUMNS if c not in frame.columns and ADDED_IN.get(c, 1) <= oldest]
    if missing:
        problems.append(f"{name}: missing columns: {', '.join(missing)}")
    unknown = [c for c in frame.columns if c not in RESULT_COLUMNS]
    if unknown:
        problems.append(f"{name}: unknown columns: {', '.join(map(str, unknown))}")
    if missing:
        return problems
    present = [c for c in RESULT_COLUMNS if c in frame.columns]
    source_re = re.compile(_SOURCE_PATTERN)

    def add(row: int, column: str, message: str) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(f"{name}:row {row + 2}: {column}: {message}")

    for i, record in enumerate(frame.to_dict("records")):
        for column in _INT_COLUMNS:
            value = str(record[column]).strip()
            if not re.fullmatch(r"-?\d+", value):
                add(i, column, f"expected an integer, got {value[:40]!r}")
        version = str(record["schema_version"]).strip()
        if version not in {str(v) for v in range(1, SCHEMA_VERSION + 1)}:
            add(i, "schema_version", f"unsupported schema version {version[:20]!r}")
        elif any(c not in present for c, since in ADDED_IN.items() if since <= int(version)):
            add(i, "schema_version", f"schema version {version} needs the columns "
                                     f"{', '.join(c for c, v in ADDED_IN.items() if v <= int(version))}")
        if not source_re.match(str(record["source"])):
            add(i, "source", f"not a source name (mistakes, ood:NAME, adv:ATTACK:EPS:flipped|all): {str(record['source'])[:60]!r}")
        status = str(record["status"])
        if status not in ("ok", "error"):
            add(i, "status", f"must be ok or error, got {status[:20]!r}")
        for column in ("benchmark", "model", "detector"):
            if not str(record[column]).strip():
                add(i, column, "empty")
        for column in _PROVENANCE:
            if column in present and not str(record[column]).strip():
                add(i, column, "missing provenance")
        for metric in METRICS:
            text = str(record[metric]).strip()
            if status != "ok":
                continue
            try:
                value = float(text)
            except ValueError:
                add(i, metric, f"expected a number, got {text[:40]!r}")
                continue
            if not 0.0 <= value <= 1.0:
                add(i, metric, f"{value} is outside [0, 1]")
        if status == "error" and not str(record["error"]).strip():
            add(i, "error", "an error row must say why")
    duplicated = frame.duplicated(KEY_COLUMNS, keep="first")
    for i in duplicated[duplicated].index[:MAX_PROBLEMS]:
        add(int(i), ",".join(KEY_COLUMNS), "duplicate key " + "/".join(str(frame.loc[i, c]) for c in KEY_COLUMNS))
    return problems


def merge_frames(frames: list[pd.DataFrame], prefer: str | None = None) -> pd.DataFrame:
    """Combine result tables; identical duplicate rows collapse, conflicting ones are refused.

    ``prefer="last"`` or ``"first"`` lets the later or earlier file win a conflict instead.
    """
    combined = pd.concat(frames, ignore_index=True)
    combined = combined.drop_duplicates()
    conflicts = combined[combined.duplicated(KEY_COLUMNS, keep=False)]
    if len(conflicts) and prefer is None:
        keys = conflicts[KEY_COLUMNS].drop_duplicates().head(5).astype(str).agg("/".join, axis=1).tolist()
        raise ValueError(f"{conflicts[KEY_COLUMNS].drop_duplicates().shape[0]} keys have conflicting rows "
                         f"(e.g. {', '.join(keys)}); choose --prefer first or --prefer last")
    combined = combined.drop_duplicates(KEY_COLUMNS, keep=prefer or "first")
    combined = combined.copy()
    combined["seed"] = combined["seed"].astype(int)
    return combined.sort_values(KEY_COLUMNS, kind="stable").reset_index(drop=True)
