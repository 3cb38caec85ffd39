"""Leaderboard files: validate (hand-made problems and fuzzing), merge, show."""
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oodbench.leaderboard import ADDED_IN, csv_text, merge_frames, pivot_table, read_results, results_frame, validate_frame
from oodbench.metrics import RULE_METRICS, compute_all, row_entropy

PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboards" / "digits" / "results.csv"


@pytest.fixture(scope="module")
def published() -> pd.DataFrame:
    return read_results(PUBLISHED)


@pytest.fixture(scope="module")
def published_v2(published) -> pd.DataFrame:
    """The published rows as schema version 2 wrote them: without the columns version 3 added."""
    return published.drop(columns=[c for c, version in ADDED_IN.items() if version >= 3], errors="ignore").assign(schema_version="2")


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in PUBLISHED.parents[1].glob("*/results.csv")))
def test_every_published_leaderboard_is_valid_and_documented(folder):
    assert validate_frame(read_results(PUBLISHED.parents[1] / folder / "results.csv")) == []
    assert f"`{folder}/`" in (PUBLISHED.parents[1] / "README.md").read_text(), "each folder has its command in the README"


def test_every_kind_of_problem_is_reported_with_row_and_column(published):
    bad = published.head(4).copy()
    bad.loc[0, "auroc"] = "1.7"
    bad.loc[1, "seed"] = "zero"
    bad.loc[2, "source"] = "ood:"
    bad.loc[3, "detector_plugin"] = ""
    bad = pd.concat([bad, bad.iloc[[0]]], ignore_index=True)
    problems = validate_frame(bad, "f.csv")
    assert "f.csv:row 2: auroc: 1.7 is outside [0, 1]" in problems
    assert "f.csv:row 3: seed: expected an integer, got 'zero'" in problems
    assert any(p.startswith("f.csv:row 4: source: not a source name") for p in problems)
    assert "f.csv:row 5: detector_plugin: missing provenance" in problems
    assert any(p.startswith("f.csv:row 6: benchmark,model,detector,source,seed: duplicate key") for p in problems)
    assert validate_frame(published.drop(columns=["auroc"]), "g.csv") == ["g.csv: missing columns: auroc"]


def test_schema_1_files_stay_valid_and_schema_2_needs_model_weights(published_v2):
    assert set(published_v2["schema_version"]) == {"2"} and published_v2["model_weights"].str.startswith("sha256:").all()
    old = published_v2.drop(columns=["model_weights"]).assign(schema_version="1")
    assert validate_frame(old, "v1.csv") == []
    assert validate_frame(published_v2.drop(columns=["model_weights"]), "v2.csv") == ["v2.csv: missing columns: model_weights"]
    mixed = pd.concat([old.iloc[1:], published_v2.head(1)], ignore_index=True)  # v1 rows lack it, the v2 row has it
    assert validate_frame(mixed, "mixed.csv") == []
    future = published_v2.head(1).assign(schema_version="5")
    assert validate_frame(future, "f.csv") == ["f.csv:row 2: schema_version: unsupported schema version '5'"]
    assert validate_frame(published_v2.head(1).assign(schema_version="3"), "f.csv")[0].startswith(
        "f.csv: missing columns: mannwhitney_p_greater, aurc, e_aurc")


def _schema_3(published: pd.DataFrame) -> pd.DataFrame:
    """Two rows of the published file brought to schema 3 with metrics of real scores: mistakes and an ood source."""
    rng = np.random.default_rng(0)
    rows = []
    for source, n_neg in (("mistakes", 12), ("ood:uniform", 40)):
        base = published[(published["source"] == source) & (published["seed"] == "0")].iloc[0].to_dict()
        values = compute_all(rng.normal(1, 1, 50), rng.normal(0, 1, n_neg), mistakes=source == "mistakes",
                             entropy=row_entropy(0, base["detector"], source))
        rows.append({**base, **values, "schema_version": 3, **dict.fromkeys(RULE_METRICS, math.nan)})
    return pd.read_csv(io.StringIO(csv_text(results_frame(rows))), dtype=str, keep_default_na=False)


def test_schema_3_rows_validate_and_merge_with_schema_2(published, published_v2):
    v3 = _schema_3(published)
    assert validate_frame(v3, "v3.csv") == []
    mistakes, ood = v3.iloc[0], v3.iloc[1]
    assert mistakes["small_sample"] == "True" and ood["small_sample"] == "False"  # 12 errors < 30 <= 40
    assert mistakes["aurc"] and mistakes["aurc_ci_low"] and not ood["aurc"] and not ood["coverage_at_95acc"]
    assert float(mistakes["auroc_ci_low"]) <= float(mistakes["auroc"]) <= float(mistakes["auroc_ci_high"])
    merged = merge_frames([published_v2.head(3), v3])  # v2 rows leave the new columns empty
    assert validate_frame(merged, "m.csv") == []
    bad = v3.copy()
    bad.loc[1, "aurc"] = "0.2"
    bad.loc[0, "small_sample"] = "False"
    bad.loc[1, "auroc_ci_low"] = ""
    assert validate_frame(bad, "b.csv") == [
        "b.csv:row 2: small_sample: says False but n_pos=50, n_neg=12 (small means fewer than 30)",
        "b.csv:row 3: aurc: must be empty: only sources of kind mistakes have it, got '0.2'",
        "b.csv:row 3: auroc_ci_low: expected a number, got ''"]
    old = merged.copy()
    old.loc[0, "mannwhitney_p_greater"] = "0.5"
    assert validate_frame(old, "o.csv") == [
        "o.csv:row 2: mannwhitney_p_greater: must be empty: not part of schema version 2, got '0.5'"]


def test_schema_4_rows_have_the_decision_rule_and_may_leave_it_empty(published):
    v4 = _schema_3(published).assign(schema_version="4")
    v4.loc[:, list(RULE_METRICS)] = "0.5"
    assert validate_frame(v4, "v4.csv") == []
    v4.loc[0, "rule_precision"] = ""  # nothing rejected: no precision
    v4.loc[1, "rule_detection_rate"] = "1.5"
    assert validate_frame(v4, "v4.csv") == ["v4.csv:row 3: rule_detection_rate: 1.5 is outside [0, 1]"]


def test_show_prints_interval_n_and_small_sample_marker(published):
    v3 = _schema_3(published)
    table = pivot_table(v3, "auroc", "github")
    row = v3.iloc[0]
    assert f"{float(row['auroc']):.3f} [{float(row['auroc_ci_low']):.3f}, {float(row['auroc_ci_high']):.3f}] n=50/12 †" \
        in table
    assert "n=50/40" in table and "**" not in table.split("\n")[2]  # the small mistakes row is never "best"
    assert "bootstrap 95% interval" in table
    assert "-" in pivot_table(v3, "aurc", "csv").splitlines()[-1]  # no AURC off the mistakes source


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_validate_never_crashes_on_garbage(tmp_path, blob):
    path = tmp_path / "garbage.csv"
    path.write_bytes(blob)
    try:
        frame = read_results(path)
    except ValueError as exc:
        assert str(path) in str(exc)
        return
    assert isinstance(validate_frame(frame, "garbage.csv"), list)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=30), min_size=1, max_size=8),
       st.sampled_from([",", ";", "\t", "|"]))
def test_validate_reports_wrong_delimiters_and_cells(tmp_path, published, cells, delimiter):
    path = tmp_path / "mixed.csv"
    header = delimiter.join(published.columns)
    path.write_text(header + "\n" + delimiter.join(cells) + "\n", encoding="utf-8")
    try:
        frame = read_results(path)
    except ValueError:
        return
    problems = validate_frame(frame, "mixed.csv")
    if len(frame) and (delimiter != "," or len(cells) != len(published.columns)):
        assert problems


def test_huge_field_is_a_clear_error(tmp_path, published):
    path = tmp_path / "huge.csv"
    path.write_text(",".join(published.columns) + "\n" + "x" * 300_000 + "\n")
    try:
        problems = validate_frame(read_results(path))
        assert problems
    except ValueError as exc:
        assert "huge.csv" in str(exc)


def test_merge_collapses_identical_rows_and_refuses_conflicts(published):
    seed0, seed1 = published[published["seed"] == "0"], published[published["seed"] == "1"]
    merged = merge_frames([seed0, pd.concat([seed0, seed1])])
    assert len(merged) == len(seed0) + len(seed1)
    changed = seed0.copy()
    changed.loc[changed.index[0], "auroc"] = "0.5"
    with pytest.raises(ValueError, match="1 keys have conflicting rows"):
        merge_frames([seed0, changed])
    key = tuple(changed.loc[changed.index[0], ["detector", "source"]])
    for prefer, expected in (("last", "0.5"), ("first", seed0.loc[seed0.index[0], "auroc"])):
        merged = merge_frames([seed0, changed], prefer=prefer).set_index(["detector", "source"])
        assert len(merged) == len(seed0) and merged.loc[key, "auroc"] == expected


def test_show_marks_the_best_and_has_every_format(published):
    table = pivot_table(published, "auroc", "markdown")
    assert table.splitlines()[0].startswith("| source")
    assert "**" in table and "±" in table
    assert pivot_table(published, "auroc", "html").startswith("<table>")
    assert pivot_table(published, "fpr_at_95tpr", "csv").splitlines()[0].startswith("source,ash-b")


def test_cli_validate_exit_codes(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\x00\x01garbage")
    run = lambda *a: subprocess.run([sys.executable, "-m", "oodbench.cli", "leaderboard", *a],
                                    capture_output=True, text=True, timeout=120)
    assert run("validate", str(PUBLISHED)).returncode == 0
    done = run("validate", str(bad))
    assert done.returncode == 1 and "Traceback" not in done.stderr and "bad.csv" in done.stdout


def test_written_files_get_ordinary_permissions(tmp_path, monkeypatch):
    from oodbench import cache

    monkeypatch.setattr(cache, "_UMASK", 0o022)  # the common umask; the temporary file itself is 0600
    path = tmp_path / "results.csv"
    cache.atomic_write(path, lambda f: f.write("a\n"), mode="w")
    assert path.stat().st_mode & 0o777 == 0o644
    assert path.read_text() == "a\n" and list(tmp_path.iterdir()) == [path], "no temporary file left behind"
