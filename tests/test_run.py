"""A run end to end on the fake benchmark (``fake_plugins/``): rows, caching, determinism, seeds, error isolation.
The default benchmark's own rows and numbers are tested beside the built-ins (``plugins/tests/test_benchmark_digits.py``)."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from fake_plugins import fake_options, fake_registry

from oodbench import hookimpl
from oodbench.api import Detector, PluginError
from oodbench.benchmark import load_benchmark
from oodbench.cli import parse_detectors
from oodbench.leaderboard import RESULT_COLUMNS, results_frame, write_run
from oodbench.runner import RunOptions, run_benchmark


def _options(registry, detectors: str, cache: Path | None, **kw) -> RunOptions:
    """The default benchmark (digits), for the tests that are about it or need the installed command's plugins."""
    bench = load_benchmark(registry.get("benchmarks", "digits").target)
    return RunOptions(benchmark=bench, detectors=parse_detectors(detectors), seeds=kw.pop("seeds", [0]),
                      cache_dir=cache, data_dir=Path("."), device=torch.device("cpu"), progress=False, **kw)


FAKE_SOURCES = ["fake-adv:0.1", "fake-ood:fake-blank", "fake-ood:fake-noise", "fake-wrong"]


def test_a_run_gives_every_row_with_finite_metrics(fakes, shared_cache):
    result = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", shared_cache), fakes)
    frame = results_frame(result.rows)
    assert sorted(frame["source"].unique()) == FAKE_SOURCES and len(frame) == 2 * len(FAKE_SOURCES)
    assert (frame["status"] == "ok").all(), frame[frame["status"] != "ok"][["detector", "source", "error"]]
    assert frame[["auroc", "aupr_in", "aupr_out", "fpr_at_95tpr", "detection_error"]].notna().all().all()
    rows = frame.set_index(["detector", "source"])
    assert rows.loc[("fake-centroid", "fake-wrong"), "source_kind"] == "mistakes"
    assert rows.loc[("fake-centroid", "fake-ood:fake-blank"), "source_kind"] == "ood"
    assert rows.loc[("fake-centroid", "fake-adv:0.1"), "source_kind"] == "adversarial"
    seed = result.meta["per_seed"][0]
    assert 0.8 < seed["test_accuracy"] < 1.0, "the fake network learns the stripes but leaves mistakes"
    wrong = rows.loc[("fake-centroid", "fake-wrong")]
    assert wrong["n_pos"] + wrong["n_neg"] + wrong["n_holdout"] == sum(seed["sources"]["fake-wrong"].values()) == 120
    assert 0 < wrong["n_neg"] < 0.2 * 120


def test_gpu_speed_options_leave_cpu_results_unchanged(fakes, shared_cache):
    plain = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", shared_cache), fakes)
    fast = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", None, bf16=True, channels_last=True), fakes)
    columns = ["detector", "source", "auroc", "aupr_in", "fpr_at_95tpr"]
    assert results_frame(fast.rows)[columns].equals(results_frame(plain.rows)[columns])
    seed = fast.meta["per_seed"][0]
    assert seed["numerics"] == {"asked": {"bf16": True, "channels_last": True}, "used": "fp32", "shared_passes": "float64"}
    extract = seed["throughput"]["extract:test"]
    assert extract["images"] == seed["passes"]["extract:test"]["forward"] == 120
    assert 0 < extract["network_share"] <= 1 and extract["images_per_second"] > 0


def test_second_run_recomputes_nothing_and_gives_identical_csv(fakes, tmp_path):
    cache = tmp_path / "cache"
    first = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", cache), fakes)
    second = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", cache), fakes)
    assert second.meta["cache"]["misses"] == 0 and second.meta["cache"]["hits"] > 0
    assert second.meta["per_seed"][0]["passes"] == {}, "a cached run must not touch the classifier"
    a = write_run(tmp_path / "a", first.rows, first.timings, first.meta)["results"].read_bytes()
    b = write_run(tmp_path / "b", second.rows, second.timings, second.meta)["results"].read_bytes()
    assert a == b
    # Without any cache the same numbers come out: the cache stores, it does not decide.
    third = run_benchmark(fake_options(fakes, "fake-confidence,fake-centroid", None), fakes)
    c = write_run(tmp_path / "c", third.rows, third.timings, third.meta)["results"].read_bytes()
    assert c == a


def test_extraction_with_layers_serves_later_runs_without_them(fakes, tmp_path):
    cache = tmp_path / "cache"
    first = run_benchmark(fake_options(fakes, "fake-layers,fake-confidence", cache), fakes)
    assert any(a.startswith("extract:") for a in first.meta["per_seed"][0]["passes"])
    assert all(r["status"] == "ok" for r in first.rows), "fake-layers read the layers it declared"
    second = run_benchmark(fake_options(fakes, "fake-confidence", cache), fakes)
    assert not any(a.startswith("extract:") for a in second.meta["per_seed"][0]["passes"]), "no pass repeated"
    mine = [(r["source"], r["auroc"]) for r in second.rows]
    assert mine == [(r["source"], r["auroc"]) for r in first.rows if r["detector"] == "fake-confidence"]


class Flaky(Detector):
    """Raises on blank images, NaN on noise, fine on the test set."""

    name = "flaky"

    def score(self, view):
        if view.name == "fake-ood:fake-blank":
            raise RuntimeError("cannot score blanks")
        values = view.logits.max(1).astype(float)
        if view.name == "fake-ood:fake-noise":
            values[0] = np.nan
        return values


class Unfittable(Detector):
    """Fails in fit."""

    name = "unfittable"

    def fit(self, ctx):
        raise PluginError("needs more data")


class Peeker(Detector):
    """Reads features without declaring them."""

    name = "peeker"

    def score(self, view):
        return view.features.sum(1)


class Mutator(Detector):
    """Writes into the arrays it is handed, which every other detector of the run shares."""

    name = "mutator"
    needs = frozenset({"logits", "features"})

    def fit(self, ctx):
        ctx.train.features[:] = 0.0

    def score(self, view):
        view.logits[:, 0] = 100.0
        return view.logits.max(1).astype(float)


class Exiter(Detector):
    """Calls sys.exit in fit, as a careless script-turned-plugin does."""

    name = "exiter"

    def fit(self, ctx):
        raise SystemExit(0)


class Broken:
    @hookimpl
    def oodbench_register_detectors(self, register):
        register(Flaky)
        register(Unfittable)
        register(Peeker)
        register(Mutator)
        register(Exiter)


def test_a_failing_detector_marks_only_its_own_rows(shared_cache):
    registry = fake_registry(Broken())
    result = run_benchmark(fake_options(registry, "fake-confidence,flaky,unfittable,peeker,exiter", shared_cache), registry)
    frame = results_frame(result.rows).set_index(["detector", "source"])
    assert (frame.loc["fake-confidence", "status"] == "ok").all() and len(frame.loc["fake-confidence"]) == 4
    assert frame.loc[("flaky", "fake-ood:fake-blank"), "error"] == "RuntimeError: cannot score blanks"
    assert "1 non-finite values" in frame.loc[("flaky", "fake-ood:fake-noise"), "error"]
    assert (frame.loc[[("flaky", "fake-wrong"), ("flaky", "fake-adv:0.1")], "status"] == "ok").all()
    assert (frame.loc["unfittable", "error"] == "fit failed: needs more data").all()
    assert "without declaring it" in frame.loc[("peeker", "fake-wrong"), "error"]
    assert (frame.loc["exiter", "error"] == "fit failed: the plugin called sys.exit(0)").all()
    assert frame.loc[("flaky", "fake-ood:fake-blank"), ["auroc"]].isna().all()


def test_seeds_repeat_the_random_parts(fakes, shared_cache, tmp_path):
    result = run_benchmark(fake_options(fakes, "fake-confidence", shared_cache, seeds=[0, 1]), fakes)
    frame = results_frame(result.rows)
    assert sorted(frame["seed"].unique()) == [0, 1]
    keys = [m["model_key"] for m in result.meta["per_seed"]]
    assert keys[0] != keys[1], "each seed trains its own classifier"
    files = write_run(tmp_path, result.rows, result.timings, result.meta)
    summary = pd.read_csv(files["summary"])
    row = summary[(summary["detector"] == "fake-confidence") & (summary["source"] == "fake-ood:fake-noise")].iloc[0]
    values = frame[(frame["detector"] == "fake-confidence") & (frame["source"] == "fake-ood:fake-noise")]["auroc"]
    assert values.iloc[0] != values.iloc[1], "each seed draws its own noise and trains its own network"
    assert row["n_seeds"] == 2
    assert row["auroc_mean"] == pytest.approx(values.mean(), abs=1e-6)
    assert row["auroc_std"] == pytest.approx(values.std(ddof=1), abs=1e-6)
    assert list(pd.read_csv(files["results"]).columns) == RESULT_COLUMNS


def test_a_detector_that_writes_into_shared_arrays_fails_alone(fakes, shared_cache, tmp_path):
    """Arrays handed to plugins are read-only: the mutator's rows are errors, fake-confidence's equal a clean run's."""
    broken = fake_registry(Broken())
    result = run_benchmark(fake_options(broken, "mutator,fake-confidence", tmp_path / "cache"), broken)
    frame = results_frame(result.rows).set_index(["detector", "source"])
    assert (frame.loc["mutator", "status"] == "error").all()
    assert frame.loc["mutator", "error"].str.contains("read-only").all()
    clean = results_frame(run_benchmark(fake_options(fakes, "fake-confidence", shared_cache), fakes).rows)
    mine = frame.loc["fake-confidence"].reset_index()
    assert mine[["source", "auroc", "fpr_at_95tpr"]].equals(clean[["source", "auroc", "fpr_at_95tpr"]])


def test_holdouts_are_random_in_order_and_keep_pairs_whole(fakes, shared_cache):
    """Issue 20 item 10: a holdout is in its seeded random order (so each half of it spans the classes even of
    a class-sorted test set), the evaluated rest sorted; where a source pairs its inputs (a clean image and its
    attacked version) both are held out or both evaluated. The built-in sources' pairs: test_benchmark_digits.py."""
    from oodbench.cache import Cache
    from oodbench.progress import Progress
    from oodbench.runner import SeedWork

    work = SeedWork(fake_options(fakes, "fake-confidence", shared_cache), fakes, Cache(shared_cache),
                    Progress(enabled=False), 0)
    sources = {s.name: s for s in work.prepare().sources}
    assert sorted(sources) == FAKE_SOURCES
    test_labels = work.id_split("test").y
    for source in sources.values():
        for held, rest in ((source.holdout_positives, source.positives), (source.holdout_negatives, source.negatives)):
            assert len(held) > 0 and not set(held.index) & set(rest.index), source.name
            assert (np.diff(rest.index) > 0).all(), "the evaluated rest is sorted"
    held = sources["fake-ood:fake-blank"].holdout_positives.index
    assert len(held) == 20 and not (np.diff(held) > 0).all(), "the holdout keeps its random order"
    assert set(test_labels[held[: len(held) // 2]]) == set(test_labels), "a half of the holdout spans every class"
    attacked = sources["fake-adv:0.1"]
    # clean image i is test image i; its attacked version is row i of the attacked set
    held_clean = set(attacked.holdout_positives.index)
    assert set(attacked.holdout_negatives.index) == held_clean, "a pair is held out whole"
    assert not set(attacked.negatives.index) & held_clean, "a pair is split between tuning and rows"
    assert list(attacked.holdout_negatives.index) == list(attacked.holdout_positives.index), "pairs in one order"
