"""The third-party path for real: build and install the example package, find it, run it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "oodbench-energy"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """The example package pip-installed (no deps, no network) into a folder put on PYTHONPATH."""
    work = tmp_path_factory.mktemp("third-party")
    source = work / "oodbench-energy"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    target = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(source)], check=True, timeout=300)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def oodbench(env, *args):
    return subprocess.run([sys.executable, "-m", "oodbench.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_installed_package_is_listed_with_its_distribution(installed):
    done = oodbench(installed, "list", "detectors")
    assert done.returncode == 0, done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith("energy-example "))
    assert "oodbench-energy 0.1.0" in line and "free energy" in line


def test_installed_package_lands_on_the_leaderboard(installed, tmp_path, shared_cache):
    done = oodbench(installed, "run", "-d", "energy-example,energy,msp", "-o", str(tmp_path), "--cache-dir",
                    str(shared_cache), "-q")
    assert done.returncode == 0, done.stderr
    rows = pd.read_csv(tmp_path / "results.csv")
    energy = rows[rows["detector"] == "energy-example"]
    assert len(energy) == 20 and (energy["status"] == "ok").all()
    assert set(energy["detector_plugin"]) == {"oodbench-energy"}
    # the same score as the built-in energy, so the same numbers on every source
    builtin = rows[rows["detector"] == "energy"]
    assert set(builtin["detector_plugin"]) == {"oodbench"}
    assert energy["auroc"].to_numpy() == pytest.approx(builtin["auroc"].to_numpy(), abs=1e-12)


def test_the_example_package_tests_pass_with_the_kit(installed):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
                          capture_output=True, text=True, env=installed, timeout=300, cwd=EXAMPLE)
    assert done.returncode == 0, done.stdout[-2000:]
