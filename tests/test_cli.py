"""The installed ``oodbench`` command as a user meets it."""
import json
import os
import shutil
import subprocess
import sys

from pathlib import Path

import pandas as pd
import pytest

OODBENCH = shutil.which("oodbench") or f"{sys.executable} -m oodbench.cli"


def run_cli(*args, env=None, cwd=None):
    command = [*OODBENCH.split(), *args]
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def test_list_shows_every_kind_with_its_provider():
    done = run_cli("list")
    assert done.returncode == 0, done.stderr
    for header in ("datasets", "models", "attacks", "detectors", "benchmarks"):
        assert header in done.stdout
    assert "msp" in done.stdout and "oodbench 0.1.0" in done.stdout
    listed = json.loads(run_cli("list", "--json").stdout)
    msp = next(d for d in listed["detectors"] if d["name"] == "msp")
    assert msp["provider"] == "oodbench" and msp["summary"].startswith("Max softmax")


def test_unknown_detector_is_one_clear_line_and_exit_2():
    done = run_cli("run", "--detectors", "msp,nope", "--no-cache")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "unknown detector 'nope'. Available detectors:" in done.stderr and "msp" in done.stderr


def test_unknown_option_and_bad_benchmark_are_clear(tmp_path):
    done = run_cli("run", "--detectors", "msp[k=3]", "--no-cache")
    assert done.returncode == 2 and "detector 'msp' has no option k" in done.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[model]\nplugin = "small-cnn"\n')
    done = run_cli("run", "--benchmark", str(bad), "--no-cache")
    assert done.returncode == 2 and "in_distribution: missing; must be a table" in done.stderr
    done = run_cli("run", "--benchmark", "nope", "--no-cache")
    assert done.returncode == 2 and "unknown benchmark 'nope'. Available benchmarks: cifar10, " in done.stderr
    assert ", digits, digits-heldout" in done.stderr


def test_run_writes_the_leaderboard_and_prints_a_table(tmp_path, shared_cache):
    out = tmp_path / "out"
    done = run_cli("run", "-d", "msp", "-o", str(out), "--cache-dir", str(shared_cache))
    assert done.returncode == 0, done.stderr
    assert "| source" in done.stdout and "ood:uniform" in done.stdout
    results = pd.read_csv(out / "results.csv")
    assert set(results["detector"]) == {"msp"} and (results["status"] == "ok").all()
    run = json.loads((out / "run.json").read_text())
    assert run["benchmark"]["name"] == "digits" and run["seeds"] == [0]
    assert run["per_seed"][0]["passes"] == {} or "extract:test" in run["per_seed"][0]["passes"]


def test_missing_npz_file_names_the_file(tmp_path):
    bench = tmp_path / "mine.toml"
    bench.write_text(
        'name = "mine"\n[in_distribution]\ndataset = "npz"\n'
        'options = { train = "train.npz", test = "test.npz", val_from_train = 10 }\n'
        '[model]\nplugin = "small-cnn"\n'
    )
    done = run_cli("run", "-b", str(bench), "-d", "msp", "--data-dir", str(tmp_path), "--no-cache")
    assert done.returncode == 1
    assert f"file for split 'train' not found: {tmp_path / 'train.npz'}" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("name, folder", [("cifar10", "cifar-10-batches-py"), ("cifar80-wrn", "cifar-100-python"),
                                                ("cifar100-te-wrn", "cifar-100-python")])
def test_paper_benchmark_without_its_data_names_the_folder(tmp_path, name, folder):
    done = run_cli("run", "-b", name, "-d", "msp", "--data-dir", str(tmp_path), "--no-cache")
    assert done.returncode == 1
    assert f"missing from {tmp_path / folder}" in done.stderr and "download = true" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow  # trains a network for 40 s: in CI's second step (python -m pytest -m slow)
def test_train_caches_the_classifier_that_run_then_starts_from(tmp_path):
    import torch

    cache = tmp_path / "cache"
    done = run_cli("train", "-b", "digits-train", "--cache-dir", str(cache), "--export", str(tmp_path / "weights-{seed}.pt"),
                   "-q")
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.split()[:2] == ["0", "small-cnn"])
    accuracy, weights = float(line.split()[2]), Path(line.split()[-1])
    assert 0.9 < accuracy <= 1.0 and weights.is_file() and cache in weights.parents
    exported = torch.load(tmp_path / "weights-0.pt", weights_only=True)["state_dict"]
    cached = torch.load(weights, weights_only=True)
    assert exported.keys() == cached.keys() and all(torch.equal(exported[k], cached[k]) for k in cached)
    # Without '{seed}' the export is one file of every seed's weights, which small-cnn's `weights` option reads.
    again = run_cli("train", "-b", "digits-train", "--cache-dir", str(cache), "--export", str(tmp_path / "all.pt"), "-q")
    assert " cache " in again.stdout and f"{accuracy:.4f}" in again.stdout
    bundle = torch.load(tmp_path / "all.pt", weights_only=True)["seeds"]
    assert list(bundle) == ["0"] and all(torch.equal(bundle["0"][k], cached[k]) for k in cached)
    out = tmp_path / "out"
    assert run_cli("run", "-b", "digits-train", "-d", "msp", "--cache-dir", str(cache), "-o", str(out), "-q").returncode == 0
    assert json.loads((out / "run.json").read_text())["per_seed"][0]["model_key"] in weights.name
    assert set(pd.read_csv(out / "results.csv")["model_weights"]) == {"trained"}, "rows say the network was trained here"
    # A bad --export is refused before any training, not after hours of it.
    refused = run_cli("train", "-b", "digits-train", "--export", str(tmp_path / "no" / "w.pt"),
                      "--cache-dir", str(tmp_path / "new"))
    assert refused.returncode == 2 and "does not exist or is not writable" in refused.stderr
    assert not (tmp_path / "new").exists()


def test_default_benchmark_loads_the_shipped_weights_and_refuses_a_changed_file(tmp_path):
    import torch
    from oodbench_plugins.models.checkpoints import BUILTIN_WEIGHTS

    shipped = BUILTIN_WEIGHTS / "digits-small-cnn.pt"
    seeds = torch.load(shipped, weights_only=True)["seeds"]
    assert list(seeds) == ["0", "1", "2", "3", "4"]
    # The benchmark pins the file by sha256: a copy with one weight changed is refused before any work.
    seeds["0"]["linear.bias"][0] += 1.0
    torch.save({"seeds": seeds}, tmp_path / "w.pt")
    bench = (shipped.parents[2] / "benchmarks" / "digits.toml").read_text()
    (tmp_path / "b.toml").write_text(bench.replace('"builtin:digits-small-cnn.pt"', '"w.pt"').replace(
        'name = "digits"', 'name = "digits-copy"'))
    done = run_cli("run", "-b", str(tmp_path / "b.toml"), "-d", "msp", "--data-dir", str(tmp_path),
                   "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o"))
    assert done.returncode == 1 and "but the benchmark expects" in done.stderr and "Traceback" not in done.stderr
    done = run_cli("run", "-d", "msp", "--first-seed", "5", "--cache-dir", str(tmp_path / "c"), "-o", str(tmp_path / "o"))
    assert done.returncode == 1 and "holds weights for seeds 0, 1, 2, 3, 4 only, not seed 5" in done.stderr


def test_help_lists_commands():
    done = run_cli("--help")
    assert done.returncode == 0 and "run" in done.stdout and "list" in done.stdout
    done = run_cli("run", "--help")
    assert "--detectors" in done.stdout and "--seeds" in done.stdout
