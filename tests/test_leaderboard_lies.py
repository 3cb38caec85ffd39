"""Leaderboard files that lie, and run folders that a kill could mix: each refused or made impossible.

Cheap: hand-made frames from the published digits results, written to tmp_path and read back.
"""
import os
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oodbench import leaderboard
from oodbench.leaderboard import (ADDED_IN, RESULT_COLUMNS, SCORES_FILE, csv_text, merge_frames, pivot_table, read_results,
                                  read_valid_results, validate_frame, write_results_csv, write_run)
from oodbench.metrics import METRICS
from oodbench.report import write_report

PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboards" / "digits" / "results.csv"
INJECTIONS = ["=cmd|' /C calc'!A0", "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A2)"]


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    """Four valid rows of schema version 2 (the published rows without version 3's columns): two detectors x two
    seeds of one source."""
    frame = read_results(PUBLISHED)
    frame = frame[(frame["source"] == "ood:uniform") & frame["seed"].isin(["0", "1"])].head(4)
    frame = frame.drop(columns=[c for c, version in ADDED_IN.items() if version >= 3], errors="ignore").assign(schema_version="2")
    assert len(frame) == 4 and validate_frame(frame) == []
    return frame.reset_index(drop=True)


def _written(tmp_path: Path, frame: pd.DataFrame, name: str = "results.csv") -> Path:
    """``frame`` written as a plain CSV (no neutralising), as a hand-edited or foreign file would be."""
    path = tmp_path / name
    frame.to_csv(path, index=False, lineterminator="\n")
    return path


def _problems(tmp_path: Path, frame: pd.DataFrame) -> list[str]:
    return validate_frame(read_results(_written(tmp_path, frame)), "f.csv")


def _with(frame: pd.DataFrame, column: str, value: str, row: int = 0) -> pd.DataFrame:
    changed = frame.copy()
    changed.loc[row, column] = value
    return changed


# -- A. Leaderboard files that lie ------------------------------------------------------

@pytest.mark.parametrize("value", ["٠.٥", "１", "0.9_9", "nan", "NaN", "inf", " 0.5", "0.5 ", "0x1p-1", "½", ""])
def test_metrics_of_ok_rows_are_ascii_decimal_numbers(tmp_path, rows, value):
    problems = _problems(tmp_path, _with(rows, "auroc", value))
    assert problems == [f"f.csv:row 2: auroc: expected a number, got {value!r}"]
    with pytest.raises(ValueError, match=r"not a valid results file \(1 problem\(s\); first: .*auroc: expected a num"):
        read_valid_results(_written(tmp_path, _with(rows, "auroc", value)))


@pytest.mark.parametrize("value", ["1.5", "-0.1", "1e999", "1.0000001"])
def test_metrics_outside_0_1_are_refused(tmp_path, rows, value):
    assert [p for p in _problems(tmp_path, _with(rows, "auroc", value)) if "outside [0, 1]" in p]


@pytest.mark.parametrize("value", ["0", "1", ".5", "0.5", "1e-16", "1.00184e-16", "+0.25", "5E-1"])
def test_plain_decimal_metrics_stay_valid(tmp_path, rows, value):
    assert _problems(tmp_path, _with(rows, "mannwhitney_p", value)) == []


def test_error_rows_have_empty_metrics(tmp_path, rows):
    failed = _with(_with(rows, "status", "error"), "error", "RuntimeError: boom")
    for metric in METRICS:
        failed.loc[0, metric] = ""
    assert _problems(tmp_path, failed) == []
    assert _problems(tmp_path, _with(failed, "auroc", "0.5")) == [
        "f.csv:row 2: auroc: an error row has no metrics, got '0.5'"]


@pytest.mark.parametrize("value", ["a\x00b", "a\nb", "a\tb", "a\x1bb", "a\u2028b", "a\u202eb", "\x85"])
def test_control_characters_are_refused_in_every_cell(tmp_path, rows, value):
    code = f"U+{ord(next(c for c in value if c != 'a' and c != 'b')):04X}"
    for column in ("detector", "error", "detector_options"):
        problems = _problems(tmp_path, _with(rows, column, value))
        assert f"f.csv:row 2: {column}: control character {code}: a cell is one line of plain text" in problems


@pytest.mark.parametrize("value", ["00", "01", "10^23", "1e3", "-1", "+1", "٣", "１", " 1", "1.0",
                                   "99999999999999999999999", "9223372036854775808", "9" * 5000])
def test_seeds_are_ascii_integers_in_range_with_one_spelling(tmp_path, rows, value):
    problems = _problems(tmp_path, _with(rows, "seed", value))
    assert [p for p in problems if p.startswith("f.csv:row 2: seed: ")], problems


def test_the_largest_int64_seed_stays_valid(tmp_path, rows):
    assert _problems(tmp_path, _with(rows, "seed", "9223372036854775807")) == []


def test_merge_refuses_a_second_spelling_of_a_seed_and_never_overflows(tmp_path, rows):
    zero = _written(tmp_path, rows.head(1), "zero.csv")
    padded = _written(tmp_path, _with(rows.head(1), "seed", "00"), "padded.csv")
    huge = _written(tmp_path, _with(rows.head(1), "seed", "10" * 12), "huge.csv")
    for path in (padded, huge):
        with pytest.raises(ValueError, match="seed"):
            read_valid_results(path)
    largest = _written(tmp_path, _with(rows.head(1), "seed", str(2**63 - 1)), "largest.csv")
    merged = merge_frames([read_valid_results(zero), read_valid_results(largest)])
    assert merged["seed"].tolist() == [0, 2**63 - 1]
    out = tmp_path / "merged.csv"
    write_results_csv(out, merged)
    assert read_valid_results(out)["seed"].tolist() == ["0", str(2**63 - 1)]


def test_duplicated_rows_are_refused_not_shown_as_zero_std(tmp_path, rows):
    path = _written(tmp_path, pd.concat([rows, rows.iloc[[0]]], ignore_index=True))
    with pytest.raises(ValueError, match="duplicate key"):
        read_valid_results(path)


@pytest.mark.parametrize("value", INJECTIONS)
def test_csv_injection_is_flagged_in_text_columns(tmp_path, rows, value):
    for column in ("detector", "error", "tuned_params", "device"):
        problems = _problems(tmp_path, _with(rows, column, value))
        assert [p for p in problems if p.startswith(f"f.csv:row 2: {column}: CSV injection: starts with {value[0]!r}")]


def test_negative_numbers_in_text_columns_are_no_injection(tmp_path, rows):
    assert _problems(tmp_path, _with(rows, "detector_version", "-1")) == []
    assert _problems(tmp_path, _with(rows, "detector_version", "'=1")) == []


@pytest.mark.parametrize("value", INJECTIONS)
def test_writers_neutralise_injection_with_a_single_quote(tmp_path, rows, value):
    frame = _with(_with(rows, "detector", value), "error", value, row=1)
    out = tmp_path / "written.csv"
    write_results_csv(out, frame)
    again = read_valid_results(out)  # what the writer wrote passes validation
    assert again.loc[0, "detector"] == "'" + value and again.loc[1, "error"] == "'" + value
    assert csv_text(again) == out.read_text(encoding="utf-8"), "neutralising is idempotent"
    table = pivot_table(frame, "auroc", "csv")
    assert f"'{value}" in table and not any(line.startswith(value) or f",{value}" in line
                                            for line in table.splitlines())


def test_numbers_are_written_untouched(tmp_path):
    frame = pd.DataFrame({"detector": ["-0.5", "=1"], "delta": [-0.5, -1e-7], "seed": [-1, 2]})
    assert csv_text(frame) == "detector,delta,seed\n-0.5,-0.5,-1\n'=1,-1e-07,2\n"


def test_written_control_characters_become_visible_and_the_file_stays_valid(tmp_path, rows):
    frame = _with(_with(rows, "detector", "msp\nx"), "error", "a\tb\x00", row=1)
    out = tmp_path / "written.csv"
    write_results_csv(out, frame)
    again = read_valid_results(out)
    assert again.loc[0, "detector"] == "msp\ufffdx" and again.loc[1, "error"] == "a\ufffdb\ufffd"


@pytest.mark.parametrize("value", ["1.5", "inf", "٠.٥"])
def test_show_and_report_refuse_lies_instead_of_ranking_them(tmp_path, rows, value):
    path = _written(tmp_path, _with(rows, "auroc", value))
    with pytest.raises(ValueError, match="not a valid results file"):
        read_valid_results(path)
    with pytest.raises(ValueError, match="not a valid results file"):
        write_report(tmp_path, tmp_path / "report.html")
    assert not (tmp_path / "report.html").exists()


def test_report_refuses_a_duplicated_row(tmp_path, rows):
    _written(tmp_path, pd.concat([rows, rows.iloc[[1]]], ignore_index=True))
    with pytest.raises(ValueError, match="duplicate key"):
        write_report(tmp_path, tmp_path / "report.html")


def test_schema_1_files_stay_valid_and_merge_with_schema_2(tmp_path, rows):
    old = rows.head(2).drop(columns=["model_weights"]).assign(schema_version="1")
    merged = merge_frames([read_valid_results(_written(tmp_path, old, "v1.csv")), rows.tail(2)])
    out = tmp_path / "merged.csv"
    write_results_csv(out, merged)
    again = read_valid_results(out)  # the v1 rows' empty model_weights is no missing provenance
    schema_2 = {c for c in RESULT_COLUMNS if ADDED_IN.get(c, 1) <= 2}  # schema 3's columns are not in either file
    assert again["schema_version"].tolist().count("1") == 2 and set(again.columns) == schema_2
    assert "f.csv:row 2: model_weights: missing provenance" in _problems(tmp_path, again.assign(schema_version="2"))


# -- fuzz -------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cells=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(RESULT_COLUMNS), st.text(max_size=40)),
                      min_size=1, max_size=6))
def test_validation_never_crashes_on_random_cells(tmp_path, rows, cells):
    frame = rows.copy()
    for row, column, text in cells:
        frame.loc[row, column] = text
    assert isinstance(validate_frame(frame, "fuzz.csv"), list)
    path = tmp_path / "fuzz.csv"
    path.write_bytes(frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    try:
        read_valid_results(path)
    except ValueError:
        pass
    write_results_csv(path, frame)  # what the writers write never holds a control character or a formula
    try:
        problems = validate_frame(read_results(path), "fuzz.csv")
    except ValueError:
        return
    assert not [p for p in problems if "control character" in p or "CSV injection" in p], problems


# -- B. Output folders ------------------------------------------------------------------

def _run_rows(rows: pd.DataFrame, detector_suffix: str = "") -> list[dict]:
    return [{**row, "detector": row["detector"] + detector_suffix} for row in rows.to_dict("records")]


def _scores(rows: list[dict]) -> dict:
    return {(r["detector"], r["source"], int(r["seed"])): (np.ones(3), np.zeros(2)) for r in rows}


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` but temporary ones (which a write may clean), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix != ".tmp"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def old_run(tmp_path, rows) -> Path:
    """A complete run folder with a report, a stale temporary file and a file of the user's own."""
    out = tmp_path / "out"
    first = _run_rows(rows)
    write_run(out, first, [], {"run": "old"}, _scores(first), benchmark_file=PUBLISHED)
    (out / "report.html").write_text("old report")
    (out / "plots").mkdir()
    (out / "plots" / "roc.png").write_bytes(b"old")
    (out / "notes.md").write_text("mine")
    killed_write = out / ".summary.csv.abc123_x.tmp"  # what a kill during an old-style write left
    killed_write.write_bytes(b"")
    hours_ago = time.time() - 2 * leaderboard.STALE_AFTER_SECONDS
    os.utime(killed_write, (hours_ago, hours_ago))
    return out


def test_a_write_failing_half_way_leaves_the_old_folder_intact(old_run, rows, monkeypatch):
    before = _snapshot(old_run)

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(leaderboard, "write_scores", killed)  # after results.csv and summary.csv are written
    second = _run_rows(rows, "-new")
    with pytest.raises(KeyboardInterrupt):
        write_run(old_run, second, [], {"run": "new"}, _scores(second))
    assert _snapshot(old_run) == before
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["out"], "no staging folder is left"


def test_a_new_run_replaces_the_old_folder_whole_and_keeps_the_users_files(old_run, rows):
    second = _run_rows(rows, "-new")
    files = write_run(old_run, second, [{"detector": "d", "source": "s", "seed": 0}], {"run": "new"})
    assert files == {"results": old_run / "results.csv", "summary": old_run / "summary.csv",
                     "timings": old_run / "timings.csv", "run": old_run / "run.json"}
    assert sorted(p.name for p in old_run.iterdir()) == ["notes.md", "results.csv", "run.json", "summary.csv",
                                                         "timings.csv"]
    assert (old_run / "notes.md").read_text() == "mine"
    assert '"run": "new"' in (old_run / "run.json").read_text()
    assert read_valid_results(old_run / "results.csv")["detector"].str.endswith("-new").all()
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["out"], "the old folder is deleted"
    assert stat.S_IMODE(old_run.stat().st_mode) == 0o777 & ~_umask()


def test_stale_staging_folders_and_temporary_files_are_removed(old_run, rows):
    parent = old_run.parent
    stale, young = parent / ".out.tmp-dead", parent / ".out.tmp-busy"
    for folder in (stale, young):
        folder.mkdir()
        (folder / "results.csv").write_text("partial")
    hours_ago = time.time() - 2 * leaderboard.STALE_AFTER_SECONDS
    os.utime(stale, (hours_ago, hours_ago))
    write_run(old_run, _run_rows(rows), [], {})
    assert not stale.exists() and young.exists(), "a young staging folder may be a concurrent run's"
    assert not list(old_run.glob(".*.tmp"))


def test_a_kill_between_the_two_renames_loses_nothing(old_run, rows, monkeypatch):
    """The old folder, set aside when the kill came, is put back by the next write, even one that fails."""
    before = _snapshot(old_run)
    aside = old_run.parent / ".out.old-killed"
    old_run.rename(aside)

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(leaderboard, "write_scores", killed)
    with pytest.raises(KeyboardInterrupt):
        write_run(old_run, _run_rows(rows), [], {}, _scores(_run_rows(rows)))
    assert _snapshot(old_run) == before and not aside.exists()


def test_a_folder_that_cannot_be_replaced_keeps_the_run_and_says_where(tmp_path, rows):
    target = tmp_path / "out"
    target.write_text("a file where the folder should be")
    with pytest.raises(ValueError, match="the run's files are complete in") as caught:
        write_run(target, _run_rows(rows), [], {})
    staging = Path(str(caught.value).rsplit(" ", 1)[1])
    assert read_valid_results(staging / "results.csv").shape[0] == len(rows)


def test_a_mount_point_is_filled_in_place_results_last(old_run, rows, monkeypatch):
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == old_run.resolve())
    second = _run_rows(rows, "-new")
    write_run(old_run, second, [], {"run": "new"})
    assert sorted(p.name for p in old_run.iterdir()) == ["notes.md", "results.csv", "run.json", "summary.csv",
                                                         "timings.csv"]
    assert read_valid_results(old_run / "results.csv")["detector"].str.endswith("-new").all()
    assert sorted(p.name for p in old_run.parent.iterdir()) == ["out"]


def test_writing_into_the_working_directory_leaves_the_process_there(old_run, rows, monkeypatch):
    monkeypatch.chdir(old_run)
    write_run(Path("."), _run_rows(rows, "-new"), [], {})
    assert Path.cwd() == old_run.resolve() and Path("results.csv").exists() and Path("notes.md").exists()


def test_a_run_without_scores_leaves_no_stale_scores(old_run, rows):
    assert (old_run / SCORES_FILE).exists()
    write_run(old_run, _run_rows(rows), [], {})
    assert not (old_run / SCORES_FILE).exists() and not (old_run / "benchmark.toml").exists()
