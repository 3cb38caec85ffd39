"""Failure sources are plugins: a third party's source makes rows through the hook alone, a broken one costs only
its own rows, and one that would shadow an in-distribution split is refused before any work."""
from dataclasses import replace

import pytest
from sklearn.metrics import roc_auc_score
from fake_plugins import fake_options
from fake_plugins.sources import FakeSources

from oodbench.api import PluginError
from oodbench.benchmark import PluginRef
from oodbench.leaderboard import results_frame
from oodbench.runner import run_benchmark


def _with_sources(registry, cache, *refs):
    """The fake benchmark (``fake_plugins/fake.toml``) with ``refs`` added to its sources."""
    opts = fake_options(registry, "fake-confidence", cache)
    return replace(opts, benchmark=replace(opts.benchmark, extra_sources=(*opts.benchmark.extra_sources, *refs)))


def test_a_third_party_source_makes_rows_and_a_broken_one_costs_only_its_own(fakes, shared_cache):
    assert {"every-other", "broken-carving"} <= set(fakes.names("sources"))
    assert fakes.get("sources", "every-other").provider == FakeSources.__name__
    opts = _with_sources(fakes, shared_cache, PluginRef("every-other", {"dataset": "fake-noise", "size": 100}),
                         PluginRef("broken-carving", {}))
    result = run_benchmark(opts, fakes)
    frame = results_frame(result.rows).set_index("source")
    row = frame.loc["every-other:fake-noise"]
    # 120 test images against 50 of the 100 noise images; the holdout takes int(0.2 n) of each side, at most
    # the benchmark's holdout_size (20)
    assert (row["n_pos"], row["n_neg"], row["n_holdout"]) == (120 - 20, 50 - 10, 20 + 10)
    assert row["status"] == "ok" and row["source_kind"] == "ood"
    positives, negatives = result.scores[("fake-confidence", "every-other:fake-noise", 0)]
    labels = [1] * len(positives) + [0] * len(negatives)
    assert row["auroc"] == pytest.approx(roc_auc_score(labels, [*positives, *negatives]), abs=1e-6)
    for name in ("broken:one", "broken:two"):
        assert frame.loc[name, "status"] == "error" and f"carving {name} broke" in frame.loc[name, "error"]
    # The benchmark's own sources' rows are those of a run without the added sources.
    clean = results_frame(run_benchmark(fake_options(fakes, "fake-confidence", shared_cache), fakes).rows)
    clean = clean.set_index("source")
    assert set(frame.index) == {*clean.index, "every-other:fake-noise", "broken:one", "broken:two"}
    columns = ["auroc", "fpr_at_95tpr", "n_pos", "n_neg"]
    assert frame.loc[clean.index, columns].equals(clean[columns])


def test_a_source_that_names_an_in_distribution_split_is_refused(fakes, tmp_path):
    opts = _with_sources(fakes, tmp_path / "cache", PluginRef("names-a-split", {}))
    with pytest.raises(PluginError, match="name of an in-distribution split"):
        run_benchmark(opts, fakes)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))


def test_a_source_whose_plan_breaks_stops_the_run_with_one_line_naming_it(fakes, tmp_path):
    opts = _with_sources(fakes, tmp_path / "cache", PluginRef("broken-planning", {}))
    with pytest.raises(PluginError, match=r"failure source 'broken-planning': image_sets\(\) failed: "
                                          r"RuntimeError: image_sets broke"):
        run_benchmark(opts, fakes)
