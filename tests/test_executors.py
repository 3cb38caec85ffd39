"""Executors: the same rows whatever runs the tasks, and a plugin that kills, crashes or hangs its
worker costs only its own rows (the local executor); Dask reruns a task whose worker died."""
import ctypes
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from oodbench import hookimpl
from oodbench.api import Detector, Executor
from oodbench.leaderboard import csv_text, results_frame
from oodbench.plan import make_plan, summary
from oodbench.runner import run_benchmark
from oodbench.tasks import Job
from fake_plugins import fake_options, fake_registry
from test_run import _options


class _MaxLogit(Detector):
    def score(self, view):
        return view.logits.max(1).astype(np.float64)


class Quitter(_MaxLogit):
    """Ends its process without unwinding (os._exit), as a C extension's abort would."""

    name = "quitter"

    def fit(self, ctx):
        os._exit(3)


class Crasher(_MaxLogit):
    """Dereferences a null pointer: a segfault."""

    name = "crasher"

    def fit(self, ctx):
        ctypes.string_at(0)


class Interrupter(_MaxLogit):
    """Raises KeyboardInterrupt itself (not the user's Ctrl-C)."""

    name = "interrupter"

    def fit(self, ctx):
        raise KeyboardInterrupt


class Sleeper(_MaxLogit):
    """Never finishes fitting."""

    name = "sleeper"

    def fit(self, ctx):
        time.sleep(3600)


class DiesOnce(_MaxLogit):
    """Kills its own worker the first time it fits (a node lost mid-task), then behaves."""

    name = "dies-once"

    def __init__(self, marker: str = ""):
        self.marker = marker

    def fit(self, ctx):
        if self.marker and not os.path.exists(self.marker):
            Path(self.marker).write_text("died once")
            os.kill(os.getpid(), signal.SIGKILL)


class Backwards(Executor):
    """A third-party executor: always runs the LAST task whose dependencies are done (collecting in plan order is
    the driver's), so independent tasks run in reverse plan order."""

    name = "backwards"

    def run(self, tasks, done):
        results, waiting = {}, list(tasks)
        while waiting:
            task = next(t for t in reversed(waiting) if all(d in results for d in t.deps))
            waiting.remove(task)
            results[task.key] = task.fn(*task.args, *(results[d] for d in task.deps))
            done(task, results[task.key])


class Misbehaving:
    @hookimpl
    def oodbench_register_detectors(self, register):
        for cls in (Quitter, Crasher, Interrupter, Sleeper, DiesOnce):
            register(cls)

    @hookimpl
    def oodbench_register_executors(self, register):
        register(Backwards)


@pytest.fixture(scope="module")
def misbehaving():
    """The fake benchmark's plugins (``fake_plugins/``) and the misbehaving ones above."""
    return fake_registry(Misbehaving())


@pytest.fixture(scope="module")
def clean(fakes, shared_cache):
    """fake-confidence's rows of the fake benchmark, run in this process."""
    return results_frame(run_benchmark(fake_options(fakes, "fake-confidence", shared_cache, executor="inline"),
                                       fakes).rows)


def test_a_plugin_that_kills_crashes_interrupts_or_hangs_its_worker_costs_only_its_rows(misbehaving, shared_cache,
                                                                                          clean):
    result = run_benchmark(fake_options(misbehaving, "quitter,fake-confidence,crasher,interrupter,sleeper",
                                        shared_cache, task_timeout=20), misbehaving)
    frame = results_frame(result.rows).set_index(["detector", "source"])
    errors = {name: set(frame.loc[name, "error"]) for name in ("quitter", "crasher", "interrupter", "sleeper")}
    assert errors["quitter"] == {"task failed: the worker process exited with status 3"}
    assert errors["crasher"] == {"task failed: the worker process died of SIGSEGV"}
    assert errors["interrupter"] == {"fit failed: KeyboardInterrupt"} or \
        errors["interrupter"] == {"task failed: KeyboardInterrupt"}
    assert errors["sleeper"] == {"task failed: ran past --task-timeout 20 s and was stopped"}
    for name in errors:  # every source of the seed has its row, each an error with empty metrics
        assert len(frame.loc[name]) == len(clean) == 4 and frame.loc[name, "auroc"].isna().all()
    mine = frame.loc[["fake-confidence"]].reset_index()
    assert csv_text(mine[clean.columns]) == csv_text(clean), "the rest of the run equals a clean run"
    per_task = result.meta["executor"]["per_task"]
    # The misbehaving detectors store no fit: one detector task each, all four failed; every other task ran.
    assert [(t["detector"], t["status"]) for t in per_task if t["kind"] == "detector"] == \
        [("quitter", "failed"), ("crasher", "failed"), ("interrupter", "failed"), ("sleeper", "failed")]
    assert all(t["status"] == "ok" for t in per_task if t["kind"] != "detector")


def test_local_inline_and_dask_give_byte_identical_results(fakes, shared_cache):
    names = "fake-confidence,fake-centroid,fake-layers"
    # At equal torch threads (a few fits round differently on other thread counts: see --threads).
    frames = {name: csv_text(results_frame(run_benchmark(
        fake_options(fakes, names, shared_cache, seeds=[0, 1], executor=name, workers=2, threads=1), fakes).rows))
        for name in ("inline", "local", "dask")}
    assert frames["inline"].count("\n") == 1 + 3 * 4 * 2 and frames["inline"].count(",ok,") == 3 * 4 * 2
    assert frames["local"] == frames["inline"]
    assert frames["dask"] == frames["inline"]


def test_a_plugin_executor_that_runs_tasks_in_another_order_gives_the_same_rows(misbehaving, shared_cache):
    assert misbehaving.get("executors", "backwards").provider != "oodbench"
    names = "fake-confidence,fake-centroid"
    inline = run_benchmark(fake_options(misbehaving, names, shared_cache, executor="inline"), misbehaving)
    backwards = run_benchmark(fake_options(misbehaving, names, shared_cache, executor="backwards"), misbehaving)
    assert csv_text(results_frame(backwards.rows)) == csv_text(results_frame(inline.rows))
    labels = [t["label"] for t in backwards.meta["executor"]["per_task"]]
    assert labels[:2] == ["classifier seed 0", "extract train seed 0"]
    assert labels[-1] == "fake-centroid on fake-adv:0.1 seed 0"


def test_dask_reruns_a_task_whose_worker_died(misbehaving, shared_cache, tmp_path, clean):
    marker = tmp_path / "died"
    result = run_benchmark(fake_options(misbehaving, f"fake-confidence,dies-once[marker={str(marker)!r}]",
                                        shared_cache, executor="dask", workers=2), misbehaving)
    assert marker.exists(), "the first attempt killed its worker"
    frame = results_frame(result.rows)
    assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"]["error"].unique()
    rerun = frame[frame["detector"] == "fake-confidence"].reset_index(drop=True)
    assert csv_text(rerun[clean.columns]) == csv_text(clean)


def test_the_plan_is_made_before_any_data_is_loaded(misbehaving, tmp_path, monkeypatch):
    from oodbench import runner

    def no_loading(*args, **kwargs):
        raise AssertionError("the plan loaded data")

    for method in ("id_split", "classifier", "_load_ood_set", "adversarial", "outputs"):
        monkeypatch.setattr(runner.SeedWork, method, no_loading)
    options = fake_options(misbehaving, "fake-confidence,fake-centroid,quitter", tmp_path, seeds=[0, 1, 2])
    tasks = make_plan(Job(options, misbehaving))
    sources = ["fake-wrong", "fake-ood:fake-blank", "fake-ood:fake-noise", "fake-adv:0.1"]  # in the file's order
    # Per seed: the classifier; train, val, test and the two generated sets extracted; the attack; the sources;
    # fake-confidence and fake-centroid store their fits (fit, then one evaluate per source); quitter stores
    # none (one detector task).
    assert summary(tasks) == {"classifier": 3, "extract": 3 * (3 + 2), "attack": 3, "sources": 3,
                              "fit": 3 * 2, "evaluate": 3 * 2 * len(sources), "detector": 3}
    assert [t.source for t in tasks if t.kind == "evaluate" and t.seed == 1 and t.detector == "fake-centroid"] == sources
    by_key = {t.key: t for t in tasks}
    assert len(by_key) == len(tasks), "task keys are unique"
    parents = {"classifier": set(), "extract": {"classifier"}, "attack": {"classifier"},
               "sources": {"extract", "attack"}, "fit": {"sources"}, "detector": {"sources"}, "evaluate": {"fit"}}
    for i, task in enumerate(tasks):  # every dependency comes first and is of its own seed, of the kinds drawn
        assert all(tasks.index(by_key[d]) < i and by_key[d].seed == task.seed for d in task.deps)
        assert {by_key[d].kind for d in task.deps} == parents[task.kind], task.label
    fit = {t.detector: t.key for t in tasks if t.kind == "fit" and t.seed == 0}
    assert all(t.deps == (fit[t.detector],) for t in tasks if t.kind == "evaluate" and t.seed == 0)
    without_store = make_plan(Job(fake_options(misbehaving, "fake-confidence,fake-centroid,quitter", None, seeds=[0]),
                                  misbehaving))
    assert summary(without_store) == {"sources": 1, "detector": 3}, "no store: nothing to hand over, coarse tasks"
    again = make_plan(Job(fake_options(misbehaving, "fake-confidence,fake-centroid,quitter", tmp_path,
                                       seeds=[0, 1, 2]), misbehaving))
    assert [t.key for t in again] == [t.key for t in tasks], "keys are stable across plans"


@pytest.mark.slow  # a minute or more: in CI's second step (python -m pytest -m slow)
def test_two_runs_on_one_store_and_a_killed_run_resumed_land_the_same_rows(registry, shared_cache, tmp_path):
    """Run A and run B start at once on an empty store; A is killed (driver and worker, kill -9) once its detector
    tasks have begun, B finishes; A run again resumes from the store. Both equal a run of their own."""
    import subprocess

    from test_cli import OODBENCH

    store = tmp_path / "store"
    command = [*OODBENCH.split(), "run", "-d", "msp,gmm", "-q", "--cache-dir", str(store)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    a = subprocess.Popen([*command, "-o", str(tmp_path / "a")], env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    b = subprocess.Popen([*command, "-o", str(tmp_path / "b")], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list(store.glob("scores/*.npz")) and a.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert a.poll() is None, "run A finished before it could be killed"
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    assert b.wait(timeout=300) == 0, b.stderr.read().decode()
    resumed = subprocess.run([*command, "-o", str(tmp_path / "a")], env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    import json

    cache = json.loads((tmp_path / "a" / "run.json").read_text())["cache"]
    assert cache["hits"] > 0 and cache["quarantined"] == [], "the resumed run read what A and B had stored"
    reference = csv_text(results_frame(run_benchmark(_options(registry, "msp,gmm", shared_cache, executor="inline"),
                                                     registry).rows))
    for run in ("a", "b"):
        assert (tmp_path / run / "results.csv").read_text() == reference


def test_plan_prints_tasks_per_kind_and_what_the_store_has(registry, shared_cache):
    from test_bad_input import run_cli

    run_benchmark(_options(registry, "msp", shared_cache, executor="inline"), registry)  # seed 0's prepare and msp

    printed = run_cli("run", "-d", "msp,gmm,nosuch-is-refused-first", "--plan", "--cache-dir", str(shared_cache))
    assert printed.returncode == 2 and "unknown detector 'nosuch-is-refused-first'" in printed.stderr
    printed = run_cli("run", "-d", "msp,gmm", "--seeds", "3", "--plan", "--cache-dir", str(shared_cache))
    assert printed.returncode == 0, printed.stderr
    table = {line.split()[0]: line.split()[1:3] for line in printed.stdout.splitlines()
             if line.startswith(("classifier ", "sources ", "fit ", "evaluate "))}
    # At least seed 0's tasks and msp's are in the store (other tests of the session may have run more).
    assert table["classifier"][0] == "3" and table["sources"][0] == "3" and table["fit"][0] == "6"
    assert table["evaluate"][0] == str(6 * 20)
    assert 1 <= int(table["classifier"][1]) <= 3 and 1 <= int(table["sources"][1]) <= 3
    assert 1 <= int(table["fit"][1]) <= 6 and 20 <= int(table["evaluate"][1]) <= 6 * 20
    assert f"-> {3 * (1 + 9 + 6 + 1 + 2 + 2 * 20)} tasks" in printed.stdout


def test_plan_keys_follow_the_datas_content_not_its_folder(registry, tmp_path):
    """Datasets are fingerprinted by the sha256 of the files they read, before loading: the same files in
    another folder plan the same keys (a task finished there counts here), changed files plan new ones."""
    import shutil
    from dataclasses import replace

    from oodbench.plan import dataset_fingerprint

    base = _options(registry, "msp,gmm", tmp_path / "store")
    npz = {"train": "train.npz", "test": "test.npz", "val_from_train": 5, "num_classes": 2}
    bench = replace(base.benchmark, in_distribution=replace(base.benchmark.in_distribution, plugin="npz", options=npz))
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    rng = np.random.default_rng(0)
    for name in ("train.npz", "test.npz"):
        np.savez(first / name, x=rng.integers(0, 256, (20, 8, 8, 1), dtype=np.uint8), y=np.arange(20) % 2)
    shutil.copytree(first, second)

    def keys(folder):
        return [t.key for t in make_plan(Job(replace(base, benchmark=bench, data_dir=folder), registry))]

    assert keys(first) == keys(second), "the same files elsewhere: the same plan"
    before = dataset_fingerprint(Job(replace(base, data_dir=second), registry), "npz", npz)
    with np.load(second / "test.npz") as data:
        x, y = data["x"].copy(), data["y"]
    x[0, 0, 0, 0] ^= 1  # one bit of one pixel
    np.savez(second / "test.npz", x=x, y=y)
    assert dataset_fingerprint(Job(replace(base, data_dir=second), registry), "npz", npz) != before
    assert not set(keys(first)) & set(keys(second)), "changed data: every task's key changes"
    (second / "test.npz").unlink()  # a missing file plans (its load will say what is missing) under its own key
    assert dataset_fingerprint(Job(replace(base, data_dir=second), registry), "npz", npz) != before
