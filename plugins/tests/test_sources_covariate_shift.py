"""The covariate-shift source (issue 19): the test set under a common corruption, read as failures (``shift:``) and
as a mistakes source of its own (``mistakes:``), checked against the corruption's formula and the classifier's
predictions computed here."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from oodbench.benchmark import PluginRef
from oodbench.cache import Cache
from oodbench.leaderboard import results_frame
from oodbench.progress import Progress
from oodbench.runner import SeedWork, run_benchmark
from test_run import _options


@pytest.fixture(scope="module")
def digits_sources(registry, shared_cache):
    work = SeedWork(_options(registry, "msp", shared_cache), registry, Cache(shared_cache), Progress(enabled=False), 0)
    return work, {source.name: source for source in work.prepare().sources}


def _contrast(x: np.ndarray, c: float) -> np.ndarray:
    """make_cifar_c.py's contrast: (x - m) c + m, m each image's mean per channel, on [0, 1] floats; rounded to uint8."""
    x = x / 255.0
    means = x.mean(axis=(2, 3), keepdims=True)
    return np.rint(np.clip((x - means) * c + means, 0, 1) * 255).astype(np.uint8)


def test_the_mistakes_reading_holds_exactly_the_shifted_images_the_classifier_gets_wrong(digits_sources):
    work, sources = digits_sources
    test = work.id_split("test")
    shifted = _contrast(test.x, 0.4)  # contrast at severity 3: c = 0.4 (make_cifar_c.py: .75, .5, .4, .3, .15)
    handle = work.classifier()[0]
    with handle.float64():
        logits = handle.outputs(torch.from_numpy(shifted.astype(np.float64) / 255.0))[0]
    wrong = np.flatnonzero(logits.argmax(1).numpy() != test.y)
    assert 30 <= len(wrong) <= len(test.y) - 30, "contrast at severity 3 makes a mistakes source worth reading"
    mistakes = sources["mistakes:contrast-3"]
    assert mistakes.kind == "mistakes"
    negatives = np.sort(np.concatenate([mistakes.negatives.index, mistakes.holdout_negatives.index]))
    positives = np.sort(np.concatenate([mistakes.positives.index, mistakes.holdout_positives.index]))
    assert negatives.tolist() == wrong.tolist()
    assert positives.tolist() == np.setdiff1d(np.arange(len(test.y)), wrong).tolist()
    assert np.array_equal(mistakes.negatives.parent.predictions, logits.argmax(1).numpy())


def test_the_shift_reading_puts_every_clean_image_against_its_corrupted_version(digits_sources):
    work, sources = digits_sources
    shift = sources["shift:contrast-3"]
    assert shift.kind == "shift"
    n = len(work.id_split("test").y)
    for held, rest in ((shift.holdout_positives, shift.positives), (shift.holdout_negatives, shift.negatives)):
        assert sorted([*held.index, *rest.index]) == list(range(n))
        assert len(held) == int(0.2 * n)


def test_readings_choose_the_rows_and_the_rows_carry_their_kind(registry, shared_cache):
    opts = _options(registry, "msp", shared_cache)
    bench = replace(opts.benchmark, mistakes=False, ood=(), attacks=(),
                    extra_sources=(PluginRef("covariate-shift", {"corruption": "contrast", "severity": 3,
                                                                 "readings": ["mistakes"]}),))
    frame = results_frame(run_benchmark(replace(opts, benchmark=bench), registry).rows).set_index("source")
    assert list(frame.index) == ["mistakes:contrast-3"]
    row = frame.loc["mistakes:contrast-3"]
    assert row["source_kind"] == "mistakes" and row["status"] == "ok"
    assert 0 <= row["e_aurc"] <= row["aurc"], "the selective-classification metrics of a mistakes source"
    full = results_frame(run_benchmark(opts, registry).rows).set_index("source")
    assert full.loc["shift:contrast-3", "source_kind"] == "shift" and np.isnan(full.loc["shift:contrast-3", "aurc"])
    assert row["auroc"] == full.loc["mistakes:contrast-3", "auroc"], "a reading does not depend on the other"
