"""Compute once: two registered names for one detector configuration share one fit and one scoring."""
import numpy as np

from fake_plugins import fake_options, fake_registry
from fake_plugins.classifier import Centroid
from oodbench import hookimpl
from oodbench.leaderboard import results_frame
from oodbench.runner import run_benchmark


class SecondName:
    """fake-centroid registered again under another name, as gmm-100 is gmm with k=100 (gmm's default)."""

    @hookimpl
    def oodbench_register_detectors(self, register):
        register(Centroid, name="fake-centroid-again")


def test_two_names_of_one_configuration_fit_once_and_score_alike(tmp_path):
    registry = fake_registry(SecondName())
    cache = tmp_path / "cache"
    result = run_benchmark(fake_options(registry, "fake-centroid,fake-centroid-again", cache), registry)
    assert len(list((cache / "fitted").glob("*.npz"))) == 1, "one fit stored for both names"
    frame = results_frame(result.rows).set_index(["source", "detector"])
    assert (frame["status"] == "ok").all()
    # the scores are the same, so every metric of them is; the bootstrap intervals and the decision rule's folds
    # draw from a generator seeded per row (detector label included), so those may differ in their last digits
    for column in ("auroc", "fpr_at_95tpr", "aupr_in", "aupr_out", "detection_error", "mannwhitney_p"):
        np.testing.assert_array_equal(frame.xs("fake-centroid", level="detector")[column],
                                      frame.xs("fake-centroid-again", level="detector")[column])
    # the same class with other options is a fit of its own
    run_benchmark(fake_options(registry, "fake-centroid[scale=2]", cache), registry)
    assert len(list((cache / "fitted").glob("*.npz"))) == 2
