"""Feature purification (the feature-GMM paper's Appendix B): the descent against its closed form, and ``oodbench
purify`` on a run folder (the gmm's density gradient is checked beside it, plugins/tests/test_detector_gmm.py)."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from oodbench.purification import purify
from test_cli import run_cli


def test_descent_on_one_gaussian_follows_its_closed_form():
    # For log p = sum_d log N(f_d; mu_d, s_d^2) the objective BPD(F) + nu ||F - F_ref||^2 is a quadratic with
    # per-dimension curvature a_d = 1 / (s_d^2 D ln 2) + 2 nu and minimiser
    # F*_d = (mu_d / (s_d^2 D ln 2) + 2 nu F_ref,d) / a_d, so gradient descent is the linear recurrence
    # F_t - F* = (1 - eta a)^t (F_ref - F*) in closed form.
    rng = np.random.default_rng(0)
    d = 6
    mu, var = rng.normal(size=d), rng.uniform(0.5, 2.0, size=d)
    start = rng.normal(size=(4, d))
    normal = torch.distributions.Normal(torch.tensor(mu), torch.tensor(np.sqrt(var)))
    for eta, nu, steps in ((0.1, 0.0, 100), (0.01, 0.1, 100), (0.5, 1.0, 7)):
        purified = purify(torch.tensor(start), lambda f: normal.log_prob(f).sum(1), eta, nu, steps).numpy()
        c = 1.0 / (var * d * math.log(2.0))
        a = c + 2 * nu
        optimum = (mu * c + 2 * nu * start) / a
        expected = optimum + (1 - eta * a) ** steps * (start - optimum)
        np.testing.assert_allclose(purified, expected, rtol=1e-10, atol=1e-12)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, shared_cache):
    out = tmp_path_factory.mktemp("purify") / "run"
    done = run_cli("run", "--detectors", "gmm,msp", "--out", str(out), "--cache-dir", str(shared_cache), "-q")
    assert done.returncode == 0, done.stderr
    return out


def test_purify_counts_what_the_run_rows_count(digits_run, shared_cache):
    done = run_cli("purify", str(digits_run), "--lr", "0.1", "--nu", "0,1", "--steps", "20",
                   "--cache-dir", str(shared_cache), "-q")
    assert done.returncode == 0, done.stderr
    assert "feature purification with gmm" in done.stdout and "fixed" in done.stdout
    table = pd.read_csv(digits_run / "purification.csv")
    assert sorted(set(zip(table["lr"], table["nu"]))) == [(0.1, 0.0), (0.1, 1.0)]
    assert set(table["steps"]) == {20} and set(table["detector"]) == {"gmm"}
    meta = json.loads((digits_run / "run.json").read_text())
    sets = table[table["scope"] == "set"].set_index(["nu", "name"])
    # before purification the counts are the run's own: the test accuracy run.json recorded
    assert sets.loc[(0.0, "test"), "accuracy_before"] == pytest.approx(meta["per_seed"][0]["test_accuracy"])
    assert {"val", "test", "adv:fgsm:0.1", "shift:contrast-3"} <= set(table["name"])
    assert not any(name.startswith("ood:") for name in table["name"])  # OOD sets have no labels of our classes
    # per source, the sides are the rows' evaluated inputs: n equals results.csv's n_pos / n_neg
    rows = pd.read_csv(digits_run / "results.csv").query("detector == 'gmm'").set_index("source")
    sources = table[(table["scope"] == "source") & (table["nu"] == 0.0)].set_index(["name", "side"])
    for source in ("mistakes", "adv:bim:0.1:flipped", "mistakes:contrast-3"):
        assert sources.loc[(source, "failures"), "n"] == rows.loc[source, "n_neg"]
        assert sources.loc[(source, "trustworthy"), "n"] == rows.loc[source, "n_pos"]
        assert sources.loc[(source, "failures"), "right_before"] == 0  # failures are wrong predictions
    for row in table.itertuples():
        assert row.right_after - row.right_before == row.fixed - row.broken
        assert 0 <= row.right_after <= row.n
    # nu = 1 keeps features closer to where they were: it changes no more predictions than nu = 0
    changed = table[table["scope"] == "set"].assign(changed=lambda t: t["fixed"] + t["broken"])
    by_nu = changed.groupby("nu")["changed"].sum()
    assert by_nu[1.0] <= by_nu[0.0]
    # the report shows it; a new run into the folder takes the old run's purification.csv away
    assert run_cli("report", str(digits_run)).returncode == 0
    page = (digits_run / "report.html").read_text()
    assert "<h2>Feature purification</h2>" in page and "<th>fixed</th>" in page


def test_purify_refuses_bad_input_in_one_line(digits_run, shared_cache, tmp_path):
    for args, message in ((("--detector", "msp"), "offers no feature density"),
                          (("--detector", "odin"), "is not one of the run's detectors"),
                          (("--lr", "0"), "--lr '0': every value must be a finite number > 0"),
                          (("--nu", "x"), "--nu 'x': expected comma-separated numbers"),
                          (("--steps", "0"), "--steps 0: must be an integer >= 1")):
        done = run_cli("purify", str(digits_run), *args, "--cache-dir", str(shared_cache), "-q")
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr
    done = run_cli("purify", str(tmp_path), "-q")
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_a_density_that_raises_is_one_line_and_exit_1(digits_run, shared_cache, monkeypatch, capsys):
    from oodbench.cli import main
    from oodbench_plugins.detectors.gmm import FeatureGMM

    def broken(self, features):
        raise RuntimeError("boom")

    monkeypatch.setattr(FeatureGMM, "log_density", broken)
    code = main(["purify", str(digits_run), "--lr", "0.1", "--nu", "0", "--steps", "1", "--cache-dir",
                 str(shared_cache), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip() == "oodbench: error: purify with gmm, seed 0: RuntimeError: boom"
