"""The executors benchmark (``benchmarks/executors.py``) in quick mode: local and dask, each from an empty store.

No assertion on time: what must hold is that the report has its figures for each executor
and that both executors land the same results CSV.
"""
import json

import executors  # a script of benchmarks/ (on sys.path from conftest)


def test_quick_mode_reports_each_executor_and_identical_results(tmp_path, capsys):
    out = tmp_path / "executors-quick.json"
    assert executors.main(["--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and report["seeds"] == [0] and report["detectors"] == ["msp", "gmm"]
    assert list(report["executors"]) == ["local-1", "dask"]
    for name, run in report["executors"].items():
        # The cut-down benchmark: mistakes, 1 OOD set, 2 attacks at one eps (2 sources each), the covariate
        # shift's two readings of one shifted set: 8 sources from 5 extracted and 2 attacked sets.
        kinds = {"classifier": 1, "extract": 5, "attack": 2, "sources": 1, "fit": 2, "evaluate": 16}
        assert run["tasks"] == sum(kinds.values()) and run["tasks_per_kind"] == kinds
        assert run["failed_tasks"] == [] and run["rows"] == 16
        assert set(run["task_seconds_per_kind"]) == set(kinds)
        assert abs(sum(k["seconds"] for k in run["task_seconds_per_kind"].values()) - run["task_seconds"]) < 1e-6
        assert run["wall_seconds"] > 0 and run["task_seconds"] > 0
        assert run["cache"]["misses"] > 0, f"{name} started from an empty store and computed its outputs"
        assert run["driver_overhead_is"] == ("upper bound" if name == "dask" else "exact")
    assert report["executors"]["dask"]["workers"] == 2
    assert report["executors"]["local-1"]["results_sha256"] == report["executors"]["dask"]["results_sha256"]
    assert report["results_identical"] == {"local-1": True, "dask": True} and report["all_results_identical"]
    assert report["speed_up"]["dask_over_local-1"] > 0
    assert "| dask | 2 x 1 |" in capsys.readouterr().out
