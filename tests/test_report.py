"""Per-input scores (scores.npz), plots and the HTML report of a run folder."""
import base64
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from oodbench.benchmark import load_benchmark
from oodbench.cli import main, parse_detectors
from oodbench.leaderboard import SCORES_FILE, read_results, read_scores, write_run, write_scores
from oodbench.metrics import INTERVALS, METRICS
from oodbench.plots import file_names, safe_name
from oodbench.report import write_report
from oodbench.runner import RunOptions, run_benchmark

# A classifier that trains in a second or two (it is poor, which gives "mistakes" many negatives),
# an OOD name with characters no file name may hold, and an attack for the ':'-laden names.
TINY = """
name = "tiny"
[in_distribution]
dataset = "digits"
[model]
plugin = "small-cnn"
options = { width = 8, epochs = 3 }
[sources]
mistakes = true
ood = [{ dataset = "uniform", name = "../noise|x" }]
[[sources.attacks]]
plugin = "fgsm"
eps = [0.1]
"""
# odin tunes on the source, so its scores come through the runner's other branch; a one-point grid keeps it cheap.
DETECTORS = "msp,logits,odin[temperatures=(1000.0,),epsilons=(0.0,)]"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def run(registry, shared_cache, tiny_benchmark, tmp_path_factory):
    """Two seeds of the tiny benchmark, written to a run folder, and the report made from it."""
    opts = RunOptions(benchmark=load_benchmark(tiny_benchmark), detectors=parse_detectors(DETECTORS), seeds=[0, 1],
                      cache_dir=shared_cache, data_dir=Path("."), device=torch.device("cpu"), progress=False)
    result = run_benchmark(opts, registry)
    folder = tmp_path_factory.mktemp("run")
    write_run(folder, result.rows, result.timings, result.meta, result.scores)
    plots = write_report(folder, folder / "report.html")
    return result, folder, plots


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def test_scores_round_trip_and_reproduce_the_published_auroc(run):
    result, folder, _ = run
    frame = read_results(folder / "results.csv")
    ok = frame[frame["status"] == "ok"]
    assert len(ok) == len(frame) == 3 * 4 * 2
    keys = [(d, s, int(seed)) for d, s, seed in zip(ok["detector"], ok["source"], ok["seed"])]
    stored = read_scores(folder / SCORES_FILE, keys)
    assert set(stored) == set(keys) == set(result.scores)
    assert any(d.startswith("odin[") for d, _, _ in stored), "the tuned branch must store its scores too"
    for key, (pos, neg) in stored.items():
        assert np.array_equal(pos, result.scores[key][0]) and np.array_equal(neg, result.scores[key][1])
        row = ok[(ok["detector"] == key[0]) & (ok["source"] == key[1]) & (ok["seed"] == str(key[2]))].iloc[0]
        assert (len(pos), len(neg)) == (int(row["n_pos"]), int(row["n_neg"]))
        labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
        # results.csv holds 6 significant digits: recomputed from the stored scores, the text must be identical.
        assert f"{roc_auc_score(labels, np.concatenate([pos, neg])):.6g}" == row["auroc"], key
    # the same scores give the same bytes (no timestamps), so a rerun's folder diffs clean
    again = folder / "again.npz"
    write_scores(again, dict(reversed(list(result.scores.items()))))
    assert again.read_bytes() == (folder / SCORES_FILE).read_bytes()


def test_report_is_one_self_contained_page_naming_everything(run):
    result, folder, _ = run
    html = (folder / "report.html").read_text(encoding="utf-8")
    page = _parse(html)
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    sources = {row["source"] for row in result.rows}
    assert len(images) == 3 * len(sources)
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix) and len(attrs["src"]) > len(prefix)
        assert base64.b64decode(attrs["src"][len(prefix):], validate=True).startswith(PNG_SIGNATURE)
    external = [attrs for _, attrs in page.tags for name in ("src", "href") if name in attrs
                and not attrs[name].startswith(("data:", "#"))]
    assert not external and "<script" not in html
    text = "".join(page.text)
    for name in {row["detector"] for row in result.rows} | sources:
        assert name in text, name
    for heading in ("AUROC", "FPR at 95% TPR", "Mann-Whitney U p-value", "Provenance"):
        assert heading in text
    assert torch.__version__ in text and result.meta["benchmark"]["sha256"] in text
    assert f"{result.meta['per_seed'][1]['test_accuracy']:.4f}" in text
    assert html.count('class="best"') >= 3 * len(sources), "each table marks the best of every source"


def test_plot_files_have_safe_names_for_every_source_and_are_reproducible(run, tmp_path):
    result, folder, plots = run
    plot_dir = folder / "plots"
    for source in {row["source"] for row in result.rows}:
        for kind in ("roc", "pr", "hist"):
            for fmt in ("png", "svg"):
                assert (plot_dir / f"{kind}-{safe_name(source)}.{fmt}") in plots
    assert sorted(plots) == sorted(plot_dir.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in plots)
    assert all(p.read_bytes().startswith(PNG_SIGNATURE) for p in plots if p.suffix == ".png")
    assert all(b"<svg" in p.read_bytes()[:1000] for p in plots if p.suffix == ".svg")
    again = write_report(folder, tmp_path / "report.html")
    assert [p.name for p in again] == [p.name for p in plots]
    for first, second in zip(plots, again):
        assert first.read_bytes() == second.read_bytes(), first.name
    assert (tmp_path / "report.html").read_bytes() == (folder / "report.html").read_bytes()


def test_safe_names():
    assert safe_name("adv:fgsm:0.1:flipped") == "adv_fgsm_0.1_flipped"
    assert safe_name("ood:../noise|x y") == "ood_.._noise_x_y"
    names = file_names(["ood:a b", "ood:a_b", "ood:" + "x" * 200])
    assert len(set(names.values())) == 3 and all(len(n) <= 89 for n in names.values())


def test_without_scores_the_report_has_tables_and_says_why(run, tmp_path):
    result, folder, _ = run
    for name in ("results.csv", "run.json"):
        shutil.copy(folder / name, tmp_path / name)
    assert write_report(tmp_path, tmp_path / "report.html") == []
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "no scores.npz" in html and "<img" not in html
    assert html.count("<table") >= 3 and all(row["detector"] in html for row in result.rows)
    (tmp_path / SCORES_FILE).write_bytes(b"not an archive")
    assert write_report(tmp_path, tmp_path / "report.html") == []
    assert "not a readable npz file" in (tmp_path / "report.html").read_text(encoding="utf-8")
    # A writer given no scores removes the stale file, which would describe other rows.
    write_run(tmp_path, result.rows, result.timings, result.meta)
    assert not (tmp_path / SCORES_FILE).exists()


def test_report_command_needs_results_csv(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "results.csv") in err and "no such file" in err and "Traceback" not in err


def test_run_report_flag_writes_the_page_and_plots(run, shared_cache, tiny_benchmark, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", "-b", str(tiny_benchmark), "-d", "msp", "--cache-dir", str(shared_cache),
                 "-o", str(out), "-q", "--report"]) == 0
    assert (out / SCORES_FILE).exists() and (out / "report.html").exists()
    assert (out / "plots" / f"roc-{safe_name('adv:fgsm:0.1:flipped')}.svg").exists()
    assert f"wrote {out / 'report.html'}" in capsys.readouterr().out


def test_failed_rows_are_listed_escaped_and_left_out_of_the_curves(run, tmp_path):
    _, folder, _ = run
    for name in ("run.json", SCORES_FILE):
        shutil.copy(folder / name, tmp_path / name)
    frame = read_results(folder / "results.csv")
    failed = (frame["detector"] == "msp") & (frame["source"] == "mistakes") & (frame["seed"] == "0")
    frame.loc[failed, ["status", "error"]] = ["error", "fit failed: <b>boom</b>"]
    frame.loc[failed, [*METRICS, *INTERVALS]] = ""
    frame.to_csv(tmp_path / "results.csv", index=False)
    write_report(tmp_path, tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "Failed rows" in html and "fit failed: &lt;b&gt;boom&lt;/b&gt;" in html and "<b>boom" not in html
    assert "Not drawn (no scores for seed 0): msp." in html


def test_tables_show_n_interval_small_sample_marker_and_selective_metrics(run, tmp_path):
    _, folder, _ = run
    for name in ("run.json", SCORES_FILE):
        shutil.copy(folder / name, tmp_path / name)
    frame = read_results(folder / "results.csv")
    small = (frame["detector"] == "msp") & (frame["source"] == "mistakes")
    frame.loc[small, ["n_neg", "small_sample"]] = ["5", "True"]  # a source too small to rank on
    frame.to_csv(tmp_path / "results.csv", index=False)
    write_report(tmp_path, tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    cell = frame[(frame["detector"] == "logits") & (frame["source"] == "ood:../noise|x")]
    low = np.mean(cell["auroc_ci_low"].astype(float))  # the mean of the seeds' lower bounds
    assert f"[{low:.3f}, " in html and f"n={cell['n_pos'].astype(int).min()}/{cell['n_neg'].astype(int).min()}" in html
    assert re.search(r"n=\d+/5 †", html) and "fewer than 30 positives or negatives" in html
    assert "Selective classification" in html and "AUGRC" in html and "two-sided" in html
