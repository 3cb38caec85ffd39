"""Leaderboard files: the long results CSV, its per-seed aggregate, and terminal tables.

``results.csv`` has one row per (benchmark, model, detector, source, seed) with the columns
of ``RESULT_COLUMNS`` in that order, sorted by those keys, so diffs read well. It holds no
timings or dates: the same command gives the same file. ``summary.csv`` has mean, std and
``n_seeds`` of every metric per (benchmark, model, detector, source) over the ok rows, the mean of
the per-seed bootstrap interval bounds, the fewest positives and negatives of a seed and whether
any seed's row was ``small_sample``.
``scores.npz`` keeps the per-input scores behind the ok rows, for plots; it is a per-run
artefact, not part of the published schema.

Every CSV written here goes through ``csv_text``, which makes text cells safe to open in a
spreadsheet, and every file read for showing, merging or reporting goes through
``read_valid_results``, so a file that lies is refused instead of rendered. ``write_run``
replaces an output folder whole, so a killed run never leaves new files beside old ones.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import shutil
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
from tabulate import tabulate

from .cache import atomic_write
from .metrics import CI_METRICS, INTERVALS, LOWER_IS_BETTER, METRICS, MISTAKES_ONLY, RULE_METRICS, SMALL_SAMPLE

KEY_COLUMNS = ["benchmark", "model", "detector", "source", "seed"]
RESULT_COLUMNS = [
    "schema_version", *KEY_COLUMNS, "status", "error",
    *METRICS, *INTERVALS, "n_pos", "n_neg", "small_sample", "n_holdout",
    "source_kind", "negatives", "tuned_on_source", "tuned_params",
    "detector_plugin", "detector_version", "detector_options",
    "benchmark_sha256", "model_weights", "device", "oodbench_version",
]
#: The schema ``results_frame`` writes; ``validate_frame`` also reads the versions before it.
SCHEMA_VERSION = 4
#: Columns each schema version added, which files of an earlier version do not have. Version 3 also
#: changed two meanings: ``detection_error`` is the minimum over thresholds (was: at 95% TPR) and
#: ``mannwhitney_p`` two-sided (was: one-sided, now ``mannwhitney_p_greater``). Version 4 added the
#: per-sample decision rule's operating point (``metrics.RULE_METRICS``).
ADDED_IN = {"model_weights": 2,
            **{c: 3 for c in ("mannwhitney_p_greater", "aurc", "e_aurc", "augrc", "coverage_at_95acc",
                              *INTERVALS, "small_sample")},
            **{c: 4 for c in RULE_METRICS}}
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
    """Per (benchmark, model, detector, source): ``n_seeds``, ``n_errors``, ``<metric>_mean`` and
    ``<metric>_std`` over the ok seeds, ``<metric>_ci_low``/``_ci_high`` (the mean over seeds of each
    seed's bootstrap bounds), ``n_pos``/``n_neg`` (the fewest of any ok seed) and ``small_sample``.

    Columns a file of an older schema lacks (intervals, mistakes metrics) come out empty.
    """
    results = results.copy()
    for metric in (*METRICS, *INTERVALS, "n_pos", "n_neg"):
        results[metric] = pd.to_numeric(results[metric], errors="coerce") if metric in results else np.nan
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
        for column in INTERVALS:
            row[column] = good[column].astype(float).mean() if len(good) else float("nan")
        for column in ("n_pos", "n_neg"):
            row[column] = int(good[column].min()) if len(good) and good[column].notna().all() else pd.NA
        row["small_sample"] = (row["n_pos"] is not pd.NA and row["n_neg"] is not pd.NA
                               and bool(min(row["n_pos"], row["n_neg"]) < SMALL_SAMPLE))
        rows.append(row)
    return pd.DataFrame(rows)


#: What OWASP lists as starting a spreadsheet formula ("CSV injection"). Tab and CR, also on its
#: list, are control characters, which no cell may hold at all.
_FORMULA_START = ("=", "+", "-", "@")
#: Characters that break a line or reorder the text around them (bidi controls): a cell holding one
#: breaks the rows of a table or reads as something other than what it is.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
#: A number every reader reads alike: ASCII digits only. ``float()`` also takes '٠.٥', '１' and
#: '0_5', which pandas then reads as NaN.
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _formula_like(text: str) -> bool:
    """Whether a spreadsheet would run ``text`` as a formula; a plain number such as -0.5 stays a number."""
    return text.startswith(_FORMULA_START) and not _DECIMAL.fullmatch(text)


def _safe_cell(value: Any) -> Any:
    """A text ``value`` as a cell that can neither break a table nor run as a formula; others unchanged.

    Control characters become U+FFFD rather than vanishing, so two names cannot merge into one key;
    a formula-like text gets OWASP's leading single quote, which spreadsheets show as text.
    """
    if not isinstance(value, str):
        return value
    value = _CONTROL.sub("\ufffd", value)
    return "'" + value if _formula_like(value) else value


def csv_text(frame: pd.DataFrame) -> str:
    """``frame`` as CSV text with every text cell made safe: what each leaderboard file is written with.

    Numeric columns are left alone, since a negative number is no formula. Whatever a plugin's error
    or a detector's label held, the file written passes ``validate_frame``'s control-character and
    CSV-injection checks, so a run's own output can always be reported.
    """
    safe = frame.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = safe[column].map(_safe_cell)
    buffer = io.StringIO()
    safe.to_csv(buffer, index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    return buffer.getvalue()


def write_results_csv(path: Path, frame: pd.DataFrame) -> None:
    """Write ``frame`` (e.g. ``merge_frames``' output) atomically as UTF-8 CSV through ``csv_text``."""
    content = csv_text(frame).encode("utf-8")
    atomic_write(Path(path), lambda f: f.write(content))


#: Entries of a run folder that a new run replaces: its own files and what was drawn from them (the report,
#: ``oodbench purify``'s table), which would describe the old run.
_RUN_OWNED = frozenset({"results.csv", "summary.csv", "timings.csv", "run.json", BENCHMARK_FILE, SCORES_FILE,
                        "report.html", "plots", "purification.csv"})
#: The temporary files of ``atomic_write`` (``.NAME.XXXXXXXX.tmp``), which a killed write leaves behind.
_TEMP_FILE = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
#: A staging folder older than this belongs to a killed run; a younger one may be a concurrent run's.
STALE_AFTER_SECONDS = 3600.0


def write_run(out_dir: Path, rows: list[dict], timings: list[dict], meta: dict,
              scores: dict[ScoreKey, tuple[np.ndarray, np.ndarray]] | None = None,
              benchmark_file: Path | None = None) -> dict[str, Path]:
    """Write results.csv, summary.csv, timings.csv, run.json and scores.npz; return their paths.

    The files are written into a fresh staging folder which then replaces ``out_dir`` whole, so a
    run killed at any point leaves the old folder or the new one, never new results beside an older
    run's summary, provenance or scores. What an earlier run owned (its files, report.html, plots/,
    purification.csv) goes; anything else in ``out_dir`` is kept. Without ``scores`` no scores.npz is written.
    ``benchmark_file`` is copied as ``benchmark.toml``, so the folder alone says what to re-run
    (``leaderboard verify``). Staging folders and temporary files of killed runs are removed.
    """
    out_dir = Path(out_dir)
    target = out_dir.resolve()  # a symlinked folder is replaced where it really is
    target.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(target)
    staging = _staging_folder(target)
    try:
        names = _write_run_files(staging, rows, timings, meta, scores, benchmark_file)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, target)
    return {key: out_dir / name for key, name in names.items()}


def _write_run_files(folder: Path, rows: list[dict], timings: list[dict], meta: dict,
                     scores: dict[ScoreKey, tuple[np.ndarray, np.ndarray]] | None,
                     benchmark_file: Path | None) -> dict[str, str]:
    """Write a run's files into the empty ``folder``; return their names by kind."""
    results = results_frame(rows)
    timing_frame = pd.DataFrame(timings, columns=["detector", "source", "seed", "fit_seconds", "score_seconds"])
    tracebacks = [{k: r[k] for k in ("detector", "source", "seed", "traceback")} for r in rows if r.get("traceback")]
    names = {"results": "results.csv", "summary": "summary.csv", "timings": "timings.csv", "run": "run.json"}
    (folder / names["results"]).write_bytes(csv_text(results).encode("utf-8"))
    (folder / names["summary"]).write_bytes(csv_text(summary_frame(results)).encode("utf-8"))
    (folder / names["timings"]).write_bytes(csv_text(timing_frame).encode("utf-8"))
    run_json = json.dumps({**meta, "tracebacks": tracebacks}, indent=2, sort_keys=True)
    (folder / names["run"]).write_bytes(run_json.encode("utf-8"))
    if benchmark_file is not None:
        names["benchmark"] = BENCHMARK_FILE
        (folder / BENCHMARK_FILE).write_bytes(Path(benchmark_file).read_bytes())
    if scores is not None:
        names["scores"] = SCORES_FILE
        write_scores(folder / SCORES_FILE, scores)
    return names


def _staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp-"


def _staging_folder(target: Path) -> Path:
    """A new empty folder on ``target``'s file system for the run's files.

    Beside ``target``, so that it can replace it whole; inside it where ``target`` cannot be renamed
    (a mount point, such as a container's volume) or its parent is not writable. ``os.mkdir`` gives
    the folder ordinary permissions (``mkdtemp``'s would be owner-only).
    """
    beside = not (target.exists() and os.path.ismount(target)) and os.access(target.parent, os.W_OK)
    if not beside:
        target.mkdir(exist_ok=True)
    staging = (target.parent if beside else target) / (_staging_prefix(target) + secrets.token_hex(6))
    os.mkdir(staging)
    return staging


def _aside_prefix(target: Path) -> str:
    return f".{target.name}.old-"


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete run in ``staging`` in place as ``target``.

    Raises ``ValueError`` naming ``staging``, which is then kept, where that fails: the run's results
    are never lost to a folder that cannot be replaced.
    """
    try:
        if staging.parent == target:
            _move_in(staging, target)
        elif target.exists():
            _replace(staging, target)
        else:
            os.rename(staging, target)
    except OSError as exc:
        raise ValueError(f"cannot replace {target} ({exc}); the run's files are complete in {staging}") from exc


def _replace(staging: Path, target: Path) -> None:
    """Replace the folder ``target`` by ``staging`` with two renames, then delete the old folder.

    POSIX has no portable atomic exchange of two folders, so the old one is renamed aside first and
    deleted only once the new one is in place: a kill between the renames leaves both complete, and
    the next write puts the old one back (``_clean_stale``).
    """
    if not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a folder")
    shutil.copymode(target, staging)  # a shared folder keeps its permissions
    _carry_foreign(target, staging)
    cwd = _cwd_inside(target)
    aside = target.parent / (_aside_prefix(target) + secrets.token_hex(6))
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if cwd is not None:
        os.chdir(cwd)  # the process stood in the old folder, now deleted: stand in the new one instead


def _cwd_inside(folder: Path) -> str | None:
    """The working directory when it is ``folder`` or inside it (``oodbench run -o .``), else None."""
    with contextlib.suppress(OSError):
        cwd = os.getcwd()
        if Path(cwd) == folder or folder in Path(cwd).parents:
            return cwd
    return None


def _carry_foreign(old: Path, new: Path) -> None:
    """Hard-link into ``new`` what ``old`` holds that no run writes (notes, a cache), so replacing keeps it.

    Links copy no data and leave ``old`` untouched until the swap; where linking fails, entries are
    copied. Temporary files and staging folders of killed writes are not carried, which removes them.
    """
    for entry in old.iterdir():
        if (entry.name in _RUN_OWNED or _TEMP_FILE.fullmatch(entry.name)
                or entry.name.startswith(_staging_prefix(old))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source: str | Path, destination: str | Path) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def _move_in(staging: Path, target: Path) -> None:
    """Move the run's files from ``staging`` (inside ``target``) into ``target``, results.csv last.

    For folders that cannot be replaced whole. The old results.csv goes first, so a kill part-way
    leaves a folder without results.csv, which ``report`` and ``verify`` refuse, rather than a mix
    they would render; the old run's other owned entries go too.
    """
    (target / "results.csv").unlink(missing_ok=True)
    new = sorted(os.listdir(staging), key=lambda name: name == "results.csv")
    for name in _RUN_OWNED - set(new):
        _remove(target / name)
    for name in new:
        os.replace(staging / name, target / name)
    staging.rmdir()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clean_stale(target: Path) -> None:
    """Undo what killed writes of ``target`` left: folders set aside or staged, and temporary files.

    A folder set aside while ``target`` is missing was killed between ``_replace``'s two renames and
    is complete, so it is put back. Staging folders and temporary files are removed once older than
    ``STALE_AFTER_SECONDS``, so a concurrent writer's are not pulled from under it. Cleaning is best
    effort: it never stops the run's files from being written.
    """
    for aside in sorted(_entries(target.parent, _aside_prefix(target))):
        with contextlib.suppress(OSError):
            if target.exists():
                shutil.rmtree(aside)
            else:
                os.rename(aside, target)
    prefix = _staging_prefix(target)
    leftovers = _entries(target.parent, prefix) + [entry for entry in _entries(target, ".")
                                                   if entry.name.startswith(prefix) or _TEMP_FILE.fullmatch(entry.name)]
    for entry in leftovers:
        with contextlib.suppress(OSError):
            if time.time() - entry.lstat().st_mtime > STALE_AFTER_SECONDS:
                _remove(entry)


def _entries(folder: Path, prefix: str) -> list[Path]:
    """The entries of ``folder`` whose names start with ``prefix``; none where it cannot be listed."""
    with contextlib.suppress(OSError):
        return [entry for entry in folder.iterdir() if entry.name.startswith(prefix)]
    return []


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


#: The marker of a cell whose rows have fewer than ``SMALL_SAMPLE`` positives or negatives.
SMALL_MARK = "†"
TABLE_NOTE = (f"mean ± std over seeds; [low, high]: bootstrap 95% interval (mean of the seeds' bounds); "
              f"n=positives/negatives (fewest of a seed); {SMALL_MARK}: fewer than {SMALL_SAMPLE} positives or "
              f"negatives, too few to rank on (never marked best)")


def pivot_cells(results: pd.DataFrame, metric: str = "auroc", number: str = "{:.3f}", details: bool = True
                ) -> tuple[list[str], list[str], dict[tuple[str, str], tuple[str, bool]]]:
    """Sources (display order), detectors, and per (source, detector) the text and whether it is best.

    The text is ``metric`` as mean ± std over seeds (the mean alone with one seed), each number
    formatted with ``number``, or ``error`` when no seed of that cell succeeded, or ``-`` where the
    metric does not apply (the selective-classification metrics off the mistakes source). With
    ``details`` it goes on with the bootstrap interval ``[low, high]`` (metrics that have one, files
    of schema 3), ``n=POS/NEG`` and ``SMALL_MARK`` for a small sample. Best is the highest mean of
    the source, the lowest for metrics where lower is better, among the cells that are not small
    samples.
    """
    summary = summary_frame(results)
    if summary.empty:
        return [], [], {}
    higher_is_better = metric not in LOWER_IS_BETTER
    sources = sorted(summary["source"].unique(), key=_source_order)
    detectors = sorted(summary["detector"].unique())
    best = {}
    for source in sources:
        rows = summary[(summary["source"] == source) & ~summary["small_sample"].astype(bool)]
        column = rows.set_index("detector")[f"{metric}_mean"].dropna()
        if len(column):
            best[source] = column.max() if higher_is_better else column.min()
    cells = {}
    for detector in detectors:
        for source in sources:
            cell = summary[(summary["source"] == source) & (summary["detector"] == detector)]
            if cell.empty or cell.iloc[0]["n_seeds"] == 0:
                cells[source, detector] = ("error", False)
                continue
            row = cell.iloc[0]
            mean, std, n = row[f"{metric}_mean"], row[f"{metric}_std"], row["n_seeds"]
            if pd.isna(mean):
                cells[source, detector] = ("-", False)
                continue
            text = number.format(mean) + (f" ± {number.format(std)}" if n > 1 else "")
            small = bool(row["small_sample"])
            if details:
                if metric in CI_METRICS and not pd.isna(row[f"{metric}_ci_low"]):
                    text += f" [{number.format(row[f'{metric}_ci_low'])}, {number.format(row[f'{metric}_ci_high'])}]"
                if not pd.isna(row["n_pos"]):
                    text += f" n={row['n_pos']}/{row['n_neg']}"
                if small:
                    text += f" {SMALL_MARK}"
            cells[source, detector] = (text, bool(source in best and not small and mean == best[source]))
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
        csv.writer(buffer, lineterminator="\n").writerows([[_safe_cell(c) for c in row] for row in transposed])
        return buffer.getvalue().rstrip("\n")
    table = tabulate(transposed[1:], headers=transposed[0], tablefmt="github" if fmt == "markdown" else fmt,
                     disable_numparse=True)
    return table if fmt == "html" else f"{table}\n\n{TABLE_NOTE}"


def _source_order(source: str) -> tuple[int, str]:
    kind = source.split(":", 1)[0]
    return ({"mistakes": 0, "adv": 1, "ood": 2, "shift": 3}.get(kind, 4), source)


# --------------------------------------------------------------------------------------
# Validation and merging of published files
# --------------------------------------------------------------------------------------
_INT_COLUMNS = ("schema_version", "seed", "n_pos", "n_neg", "n_holdout")
#: Columns of free text, where a cell must not start a spreadsheet formula.
_TEXT_COLUMNS = frozenset(RESULT_COLUMNS) - set(_INT_COLUMNS) - set(METRICS) - set(INTERVALS)
#: Seeds go to numpy and torch, and merged files to pandas, as int64.
_INT_LIMIT = 2**63
_SCHEMA_VERSIONS = frozenset(str(v) for v in range(1, SCHEMA_VERSION + 1))
# A source plugin's row names: a lower-case word, then ':'-separated parts (mistakes, ood:NAME,
# adv:ATTACK:EPS:flipped|all, shift:CORRUPTION-SEVERITY, mistakes:CORRUPTION-SEVERITY, ...).
_SOURCE_PATTERN = r"^[a-z][a-z0-9_-]*(:[^:\s]+)*$"
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


def read_valid_results(path: Path) -> pd.DataFrame:
    """A results CSV that ``validate_frame`` accepts, or ``ValueError`` with the count of problems and the first.

    Whatever shows, merges or reports a file reads it through this, so a file that lies (AUROC 1.5
    or '٠.٥', a duplicated row, a formula, a seed spelled '00') is refused with the reason instead
    of being rendered as a result.
    """
    frame = read_results(path)
    problems = validate_frame(frame, str(path))
    if problems:
        raise ValueError(f"{path} is not a valid results file ({len(problems)} problem(s); first: {problems[0]}); "
                         "run 'oodbench leaderboard validate' on it")
    return frame


def validate_frame(frame: pd.DataFrame, name: str = "results.csv") -> list[str]:
    """Every problem of a results table, as ``file:row N: column: problem`` (row 2 = first data row)."""
    problems: list[str] = []
    versions = set(frame["schema_version"].astype(str)) if "schema_version" in frame.columns else set()
    # Columns are asked of the oldest version present; a file of no known version is judged by the columns every
    # version has, so that its rows say "unsupported schema version" rather than list what later versions added.
    oldest = min((int(v) for v in versions & _SCHEMA_VERSIONS), default=1)
    missing = [c for c in RESULT_COLUMNS if c not in frame.columns and ADDED_IN.get(c, 1) <= oldest]
    if missing:
        problems.append(f"{name}: missing columns: {', '.join(missing)}")
    unknown = [c for c in frame.columns if c not in RESULT_COLUMNS]
    if unknown:
        problems.append(f"{name}: unknown columns: {', '.join(map(str, unknown))}")
    if missing:
        return problems
    present = [c for c in RESULT_COLUMNS if c in frame.columns]

    def add(row: int, column: str, message: str) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(f"{name}:row {row + 2}: {column}: {message}")

    for i, record in enumerate(frame.to_dict("records")):
        for column, message in _row_problems({str(k): _as_text(v) for k, v in record.items()}, present):
            add(i, column, message)
    duplicated = frame.duplicated(KEY_COLUMNS, keep="first")
    for i in duplicated[duplicated].index[:MAX_PROBLEMS]:
        add(int(i), ",".join(KEY_COLUMNS), "duplicate key " + "/".join(str(frame.loc[i, c]) for c in KEY_COLUMNS))
    return problems


def _as_text(value: Any) -> str:
    """A cell as a CSV file holds it, so frames built in memory are judged like files: a missing value is empty."""
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


def _row_problems(record: dict[str, str], present: list[str]) -> Iterator[tuple[str, str]]:
    """(column, problem) for each problem of one row, its cells given as text."""
    for column, text in record.items():
        message = _cell_problem(column, text)
        if message:
            yield column, message
    for column in _INT_COLUMNS:
        message = _integer_problem(record[column])
        if message:
            yield column, message
    version = record["schema_version"]
    if version not in _SCHEMA_VERSIONS:
        yield "schema_version", f"unsupported schema version {version[:20]!r}"
        version = str(SCHEMA_VERSION)  # judge the rest by the current schema
    elif any(c not in present for c, since in ADDED_IN.items() if since <= int(version)):
        yield "schema_version", (f"schema version {version} needs the columns "
                                 f"{', '.join(c for c, v in ADDED_IN.items() if v <= int(version))}")
    if not re.match(_SOURCE_PATTERN, record["source"]):
        yield "source", (f"not a source name (a word, then ':'-separated parts: mistakes, ood:NAME, "
                         f"adv:ATTACK:EPS:flipped|all): {record['source'][:60]!r}")
    status = record["status"]
    if status not in ("ok", "error"):
        yield "status", f"must be ok or error, got {status[:20]!r}"
    for column in ("benchmark", "model", "detector"):
        if not record[column].strip():
            yield column, "empty"
    for column in _PROVENANCE:
        # A row of an older version has no value for a column added later, also in a merged file that has it.
        if column in present and ADDED_IN.get(column, 1) <= int(version) and not record[column].strip():
            yield column, "missing provenance"
    for metric in (*METRICS, *INTERVALS):
        if metric not in present:  # a column of a later version, which this file does not have
            continue
        if ADDED_IN.get(metric, 1) > int(version):
            why = f"not part of schema version {version}"
        elif metric in MISTAKES_ONLY and record.get("source_kind", record["source"]) != "mistakes":
            why = "only sources of kind mistakes have it"
        elif metric in RULE_METRICS and not record[metric]:
            continue  # undefined with fewer than 2 inputs on a side; the precision, where nothing is rejected
        else:
            why = ""
        message = _metric_problem(record[metric], status, why)
        if message:
            yield metric, message
    if "small_sample" in present:
        message = _small_sample_problem(record, int(version))
        if message:
            yield "small_sample", message
    if status == "error" and not record["error"].strip():
        yield "error", "an error row must say why"


def _cell_problem(column: str, text: str) -> str | None:
    """Why a cell of any column cannot be shown or opened safely, or None."""
    control = _CONTROL.search(text)
    if control:
        return f"control character U+{ord(control.group()):04X}: a cell is one line of plain text"
    if column in _TEXT_COLUMNS and _formula_like(text):
        return (f"CSV injection: starts with {text[0]!r}, which spreadsheets run as a formula "
                f"(prefix it with a single quote): {text[:40]!r}")
    return None


def _integer_problem(text: str) -> str | None:
    """Why ``text`` is not an integer as oodbench writes it, or None.

    One spelling per number: '00' beside '0' would be a second key for one seed, and a number beyond
    int64 overflows where it is used.
    """
    if not re.fullmatch(r"[0-9]+", text):
        return f"expected an integer, got {text[:40]!r}"
    if len(text) > 1 and text.startswith("0"):
        return f"expected an integer without leading zeros, got {text[:40]!r}"
    if len(text) > len(str(_INT_LIMIT)) or int(text) >= _INT_LIMIT:
        return f"{text[:40]} is out of range (at most 2**63 - 1)"
    return None


def _small_sample_problem(record: dict[str, str], version: int) -> str | None:
    """Why ``small_sample`` is wrong: from version 3 ``True`` or ``False`` as n_pos or n_neg is below
    ``SMALL_SAMPLE``; empty in rows of earlier versions."""
    text = record["small_sample"]
    if version < ADDED_IN["small_sample"]:
        return f"must be empty: not part of schema version {version}, got {text[:40]!r}" if text else None
    if text not in ("True", "False"):
        return f"expected True or False, got {text[:40]!r}"
    counts = (record["n_pos"], record["n_neg"])
    if all(_integer_problem(n) is None for n in counts):
        expected = min(int(n) for n in counts) < SMALL_SAMPLE
        if (text == "True") != expected:
            return f"says {text} but n_pos={counts[0]}, n_neg={counts[1]} (small means fewer than {SMALL_SAMPLE})"
    return None


def _metric_problem(text: str, status: str, empty_because: str = "") -> str | None:
    """Why ``text`` is not the metric of a row with ``status``, or None: a number in [0, 1] when ok, empty on error
    and where ``empty_because`` says why the row has no such metric."""
    if empty_because:
        return f"must be empty: {empty_because}, got {text[:40]!r}" if text else None
    if status == "error":
        return f"an error row has no metrics, got {text[:40]!r}" if text else None
    if status != "ok":
        return None  # the status itself is reported
    if not _DECIMAL.fullmatch(text):
        return f"expected a number, got {text[:40]!r}"
    value = float(text)
    return None if 0.0 <= value <= 1.0 else f"{value} is outside [0, 1]"


def merge_frames(frames: list[pd.DataFrame], prefer: str | None = None) -> pd.DataFrame:
    """Combine result tables; identical duplicate rows collapse, conflicting ones are refused.

    The frames must be valid (``read_valid_results``): only then is each seed spelled one way, so
    equal keys compare equal as text, and small enough for int64.

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
