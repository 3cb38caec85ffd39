"""``oodbench leaderboard verify``: published rows re-run and compared within stated tolerances."""
import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from oodbench.leaderboard import read_results
from oodbench.verify import (DEFAULT_TOLERANCES, VerifyError, compare, load_published, parse_filters,
                             parse_tolerances)
from test_cli import run_cli

PUBLISHED = Path(__file__).resolve().parents[1] / "leaderboards"


def _row(detector="msp", source="ood:gaussian", seed=0, kind="ood", auroc=0.9, status="ok", options="{}"):
    return {"detector": detector, "source": source, "seed": str(seed), "source_kind": kind, "auroc": str(auroc),
            "status": status, "error": "" if status == "ok" else "boom", "detector_options": options}


def test_compare_applies_each_kinds_tolerance_and_fails_what_moved():
    published = pd.DataFrame([
        _row(source="ood:gaussian", auroc=0.9000),
        _row(source="ood:uniform", auroc=0.9000),
        _row(source="adv:fgsm:0.1:all", kind="adversarial", auroc=0.8000),
        _row(source="mistakes", kind="mistakes", auroc=0.7000),
        _row(source="ood:hflip", status="error", auroc=""),
        _row(source="ood:vflip", auroc=0.5),
        _row(detector="gmm", source="ood:gaussian", options='{"k": 100}'),
    ])
    fresh = pd.DataFrame([
        _row(source="ood:gaussian", auroc=0.9049),          # within 0.005
        _row(source="ood:uniform", auroc=0.8940),           # 0.006 > 0.005
        _row(source="adv:fgsm:0.1:all", kind="adversarial", auroc=0.8190),  # within 0.02
        _row(source="mistakes", kind="mistakes", status="error", auroc=""),
        _row(source="ood:hflip", status="error", auroc=""),
        # ood:vflip missing from the re-run
        _row(detector="gmm", source="ood:gaussian", options='{"k": 10}'),
    ])
    table = compare(published, fresh).set_index(["detector", "source"])
    assert table["holds"].to_dict() == {
        ("msp", "ood:gaussian"): True, ("msp", "ood:uniform"): False, ("msp", "adv:fgsm:0.1:all"): True,
        ("msp", "mistakes"): False, ("msp", "ood:hflip"): True, ("msp", "ood:vflip"): False,
        ("gmm", "ood:gaussian"): False}
    assert table.loc[("msp", "ood:uniform"), "difference"] == pytest.approx(0.006)
    assert table.loc[("msp", "adv:fgsm:0.1:all"), "tolerance"] == DEFAULT_TOLERANCES["adversarial"] == 0.02
    assert "status ok became error" in table.loc[("msp", "mistakes"), "why"]
    assert table.loc[("msp", "ood:vflip"), "why"] == "not produced by the re-run"
    assert table.loc[("gmm", "ood:gaussian"), "why"] == "the detector's resolved options changed"
    assert math.isnan(table.loc[("msp", "ood:hflip"), "difference"])


def test_tolerance_and_filter_arguments():
    assert parse_tolerances(None) == {"mistakes": 0.005, "ood": 0.005, "adversarial": 0.02, "shift": 0.005}
    assert parse_tolerances(["0.01"]) == {"mistakes": 0.01, "ood": 0.01, "adversarial": 0.01, "shift": 0.01}
    assert parse_tolerances(["adversarial=0.05"])["adversarial"] == 0.05
    for bad in (["x"], ["-1"], ["nan"], ["drift=0.1"]):
        with pytest.raises(VerifyError):
            parse_tolerances(bad)
    assert parse_filters(["detector=gmm*", "seed=0"]) == {"detector": "gmm*", "seed": "0"}
    for bad in (["detector"], ["auroc=1"], ["seed="]):
        with pytest.raises(VerifyError):
            parse_filters(bad)


def test_published_folders_carry_what_verify_needs():
    for folder in ("digits", "cifar10-resnet20"):
        published = load_published(PUBLISHED / folder)
        assert len(published.rows) == len(read_results(PUBLISHED / folder / "results.csv"))
        run = json.loads((PUBLISHED / folder / "run.json").read_text())
        environment = run["environment"]
        assert environment["packages"]["torch"] and environment["cpu"]["name"] and environment["threads"]["torch"]


@pytest.fixture(scope="module")
def published_msp(tmp_path_factory, shared_cache):
    """A fresh run of msp on the default benchmark, written as a published folder."""
    out = tmp_path_factory.mktemp("published") / "digits"
    done = run_cli("run", "-d", "msp", "--cache-dir", str(shared_cache), "-o", str(out), "-q")
    assert done.returncode == 0, done.stderr
    return out


def test_verify_passes_on_an_honest_folder_and_fails_on_a_tampered_row(published_msp, shared_cache, tmp_path):
    done = run_cli("leaderboard", "verify", str(published_msp), "--cache-dir", str(shared_cache), "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20 of 20 rows hold (20 exactly" in done.stdout
    tampered = tmp_path / "tampered"
    shutil.copytree(published_msp, tampered)
    frame = pd.read_csv(tampered / "results.csv", dtype=str, keep_default_na=False)
    at = frame.index[frame["source"] == "ood:uniform"][0]
    frame.loc[at, "auroc"] = f"{float(frame.loc[at, 'auroc']) - 0.05:.6g}"
    frame.to_csv(tampered / "results.csv", index=False, lineterminator="\n")
    done = run_cli("leaderboard", "verify", str(tampered), "--cache-dir", str(shared_cache), "-q")
    assert done.returncode == 1
    line = next(line for line in done.stdout.splitlines() if "ood:uniform" in line)
    assert "FAIL" in line and "0.05" in line
    assert "19 of 20 rows hold" in done.stdout


def test_verify_refuses_a_changed_benchmark_and_bad_requests_before_any_work(published_msp, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(published_msp, changed)
    with open(changed / "benchmark.toml", "a") as handle:
        handle.write("\n# edited after publication\n")
    cache = tmp_path / "cache"
    done = run_cli("leaderboard", "verify", str(changed), "--cache-dir", str(cache))
    assert done.returncode == 2 and "the benchmark changed since publication" in done.stderr
    assert "Traceback" not in done.stderr and not cache.exists()
    for args, message in ((["--rows", "detector=nope"], "no rows match"), (["--rows", "color=red"], "--rows"),
                          (["--tolerance", "big"], "--tolerance")):
        done = run_cli("leaderboard", "verify", str(published_msp), "--cache-dir", str(cache), *args)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not cache.exists()
    done = run_cli("leaderboard", "verify", str(tmp_path / "nothing-here"))
    assert done.returncode == 2 and "not a folder" in done.stderr


def test_published_digits_rows_verify_here(shared_cache):
    """The published leaderboard, re-run for its cheap rows (seed 1: not the seed the suite's other runs use)."""
    done = run_cli("leaderboard", "verify", str(PUBLISHED / "digits"), "--rows", "detector=msp|logits",
                   "--rows", "seed=1", "--cache-dir", str(shared_cache), "-q")
    assert done.returncode == 2 and "no rows match" in done.stderr  # globs have no alternation: one detector per run
    done = run_cli("leaderboard", "verify", str(PUBLISHED / "digits"), "--rows", "detector=msp", "--rows", "seed=1",
                   "--cache-dir", str(shared_cache), "-q")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20 of 20 rows hold" in done.stdout
