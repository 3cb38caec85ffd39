"""Compute once: two registered names for one detector configuration share one fit and one scoring."""
import numpy as np

from oodbench.leaderboard import results_frame
from oodbench.runner import run_benchmark
from test_run import _options


def test_two_names_of_one_configuration_fit_once_and_score_alike(registry, tmp_path):
    # gmm-100 is FeatureGMM registered with k=100, which is gmm's default: the same class and resolved options
    cache = tmp_path / "cache"
    result = run_benchmark(_options(registry, "gmm,gmm-100", cache), registry)
    assert len(list((cache / "fitted").glob("*.npz"))) == 1, "one fit stored for both names"
    frame = results_frame(result.rows).set_index(["source", "detector"])
    # the scores are the same, so every metric of them is; the bootstrap intervals and the decision rule's folds
    # draw from a generator seeded per row (detector label included), so those may differ in their last digits
    for column in ("auroc", "fpr_at_95tpr", "aupr_in", "aupr_out", "detection_error", "mannwhitney_p"):
        np.testing.assert_array_equal(frame.xs("gmm", level="detector")[column],
                                      frame.xs("gmm-100", level="detector")[column])
    labels = {row["detector"]: row["detector_options"] for row in result.rows}
    assert set(labels) == {"gmm", "gmm-100"} and labels["gmm"] == labels["gmm-100"]
    # a different configuration of the same class is a fit of its own
    run_benchmark(_options(registry, "gmm[k=50]", cache), registry)
    assert len(list((cache / "fitted").glob("*.npz"))) == 2
