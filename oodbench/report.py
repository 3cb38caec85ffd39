"""``oodbench report``: one self-contained HTML page about a run folder.

The page holds the leaderboard tables (AUROC, FPR at 95% TPR, Mann-Whitney U p-value; mean ±
std over seeds, the bootstrap interval and n beside each figure, small samples marked, best per
source in bold), the selective-classification metrics of each source of kind mistakes, feature
purification's tables when ``oodbench purify`` wrote ``purification.csv`` into the folder, the failed
rows, the plots of ``plots.py`` embedded as PNG data URIs, and the run's provenance from
``run.json``. It loads nothing from elsewhere, so it can be mailed or attached to an issue as one
file. Every text from the run folder is HTML-escaped. Without ``scores.npz`` the page has the tables and says why the plots are
missing; without ``results.csv`` there is nothing to report and ``ValueError`` says so.
"""
from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd

from .cache import atomic_write
from .leaderboard import TABLE_NOTE, _source_order, pivot_cells
from .plots import RunData, iter_plots, load_run, write_plot

TABLES = (
    ("auroc", "AUROC", "{:.3f}", "higher is better"),
    ("fpr_at_95tpr", "FPR at 95% TPR", "{:.3f}", "lower is better"),
    ("mannwhitney_p", "Mann-Whitney U p-value", "{:.2g}",
     "two-sided, as the feature-GMM paper tests; the direction is AUROC's; lower is better"),
    ("rule_detection_rate", "Per-sample decision rule: failures rejected", "{:.3f}",
     "the feature-GMM paper's test (Section 3.3): inputs scored below a threshold are rejected, the threshold "
     "the best F1 of 5-fold cross-validation on the row's inputs; higher is better; the trustworthy inputs it "
     "rejects and its precision are results.csv's rule_false_rejection_rate and rule_precision"),
)
#: The mistakes source's selective-classification metrics: (metric, heading, direction).
SELECTIVE = (
    ("aurc", "AURC", "lower is better"),
    ("e_aurc", "E-AURC", "AURC minus the oracle's; lower is better"),
    ("augrc", "AUGRC", "Traub et al. 2024; lower is better"),
    ("coverage_at_95acc", "coverage at 95% selective accuracy", "higher is better"),
)
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th:first-child, td:first-child, .text td { text-align: left; }
.text td { white-space: normal; }
td.best { background: #e6f4e6; }
figure { display: inline-block; margin: 0.5em 1em 1.5em 0; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; }
figcaption { font-size: 0.8em; max-width: 48em; color: #444; }
.note { background: #fff6e0; border-left: 4px solid #e0a000; padding: 0.5em 1em; }
code { font-size: 0.9em; }
"""


def write_report(run_dir: Path, out: Path) -> list[Path]:
    """Write the HTML page to ``out`` and the plots (PNG and SVG) under ``out``'s folder ``plots/``.

    Returns the plot files written. Raises ``ValueError`` when ``run_dir`` has no valid results.csv.
    """
    run_dir, out = Path(run_dir), Path(out)
    run = load_run(run_dir)
    meta, meta_note = _read_meta(run_dir / "run.json")
    plots_dir = out.parent / "plots"
    sections, written = [], []
    for plot in iter_plots(run):
        rendered = write_plot(plot, plots_dir)
        written += [plots_dir / f"{plot.stem}.{fmt}" for fmt in rendered]
        sections.append((plot.source, plot.kind, _figure(rendered["png"], plot.caption)))
    page = _page(run, meta, meta_note, sections, _purification(run_dir / "purification.csv"))
    atomic_write(out, lambda f: f.write(page), mode="w")
    return written


def _read_meta(path: Path) -> tuple[dict[str, Any], str]:
    """run.json as a dict, or an empty one and a note saying why the provenance is missing."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"no {path.name} in the run folder: provenance unknown"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return {}, f"{path} is not readable JSON ({exc}): provenance unknown"
    if not isinstance(meta, dict):
        return {}, f"{path} does not hold a JSON object: provenance unknown"
    return meta, ""


def _purification(path: Path) -> list[str]:
    """The report's feature-purification section, from ``oodbench purify``'s CSV (none without one)."""
    from .purification import SOURCE_HEADERS, summary

    if not path.is_file():
        return []
    try:
        table = pd.read_csv(path)
        headers, setting_rows, source_rows = summary(table)
    except (OSError, ValueError, KeyError) as exc:
        return ["<h2>Feature purification</h2>", f'<p class="note">{escape(path.name)} is not readable ({escape(str(exc))})</p>']
    label = ", ".join(sorted(set(table["detector"].astype(str))))
    parts = ["<h2>Feature purification</h2>",
             f"<p>The feature-GMM paper's Appendix B with the density of <code>{escape(label)}</code>: each input's "
             "features descend F := F - eta (grad BPD(F) + 2 nu (F - F_ref)) for "
             f"{escape(', '.join(map(str, sorted(set(table['steps'])))))} steps and are classified again by the "
             "network's final layer. Accuracy (%) before (<em>original</em>) and after, mean over seeds; the paper's "
             "Table 4 reports the same on CIFAR-100 (at most +0.6 points).</p>",
             _table(headers, setting_rows)]
    if source_rows:
        parts += ["<p>Per failure source at the setting of best val accuracy: of its failures (negatives) how many "
                  "the classifier gets right after purification (<em>fixed</em>), and of its trustworthy inputs "
                  "(positives) how many it now gets wrong (<em>broken</em>); counts summed over seeds.</p>",
                  _table(list(SOURCE_HEADERS), [[str(c) for c in row] for row in source_rows])]
    return parts


def _page(run: RunData, meta: dict[str, Any], meta_note: str, plots: list[tuple[str, str, str]],
          purification: list[str] = ()) -> str:
    results = run.results
    benchmark = str(results["benchmark"].iloc[0]) if len(results) else "(empty)"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>oodbench report: {escape(benchmark)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>oodbench report: {escape(benchmark)}</h1>",
        f"<p>Model <code>{escape(str(results['model'].iloc[0]) if len(results) else '')}</code>; "
        f"{results['detector'].nunique()} detectors x {results['source'].nunique()} failure sources x "
        f"{results['seed'].nunique()} seed(s); {int((results['status'] != 'ok').sum())} failed row(s). Positives are "
        "the trustworthy inputs (correctly classified, clean, in-distribution), which a detector should score "
        "higher.</p>",
    ]
    for metric, title, number, direction in TABLES:
        parts.append(f"<h2>{escape(title)}</h2>")
        parts.append(f"<p>{escape(direction[0].upper() + direction[1:])}; the best of each source in bold. "
                     f"Cells: {escape(TABLE_NOTE)}.</p>")
        parts.append(_pivot_html(results, metric, number))
    # Every source of kind mistakes (the test set's, and e.g. covariate shift's mistakes reading) has them.
    for source in sorted(set(results.loc[results["source_kind"] == "mistakes", "source"]), key=_source_order):
        parts.append(f"<h2>Selective classification ({escape(source)})</h2>")
        parts.append("<p>Accepting the inputs a detector scores highest, the risk is the error rate among those "
                     "accepted: " + "; ".join(f"{escape(t)} ({escape(d)})" for _, t, d in SELECTIVE)
                     + f". Cells: {escape(TABLE_NOTE)}.</p>")
        parts.append(_selective_html(results, source))
    parts += purification
    errors = results[results["status"] != "ok"]
    if len(errors):
        parts.append("<h2>Failed rows</h2>")
        parts.append(_table(["detector", "source", "seed", "error"],
                            errors[["detector", "source", "seed", "error"]].astype(str).values.tolist(), css="text"))
    parts.append("<h2>Plots</h2>")
    parts += [f'<p class="note">{escape(note)}</p>' for note in run.notes]
    if plots:
        parts.append("<p>The same figures are written as PNG and SVG files under <code>plots/</code> next to "
                     "this page.</p>")
    current = None
    for source, _, figure in plots:
        if source != current:
            parts.append(f"<h3>{escape(source)}</h3>")
            current = source
        parts.append(figure)
    parts.append("<h2>Provenance</h2>")
    if meta_note:
        parts.append(f'<p class="note">{escape(meta_note)}</p>')
    parts.append(_provenance(meta, results))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _pivot_html(results: pd.DataFrame, metric: str, number: str) -> str:
    sources, detectors, cells = pivot_cells(results, metric, number)
    if not sources:
        return "<p>(no results)</p>"
    header = "<tr><th>source</th>" + "".join(f"<th>{escape(d)}</th>" for d in detectors) + "</tr>"
    rows = []
    for source in sources:
        tds = []
        for detector in detectors:
            text, best = cells[source, detector]
            tds.append(f'<td class="best"><strong>{escape(text)}</strong></td>' if best else f"<td>{escape(text)}</td>")
        rows.append(f"<tr><td>{escape(source)}</td>{''.join(tds)}</tr>")
    return f"<table><thead>{header}</thead><tbody>{''.join(rows)}</tbody></table>"


def _selective_html(results: pd.DataFrame, source: str) -> str:
    """Detectors x the selective-classification metrics on ``source``, a source of kind mistakes."""
    mistakes = results[results["source"] == source]
    columns = [pivot_cells(mistakes, metric) for metric, _, _ in SELECTIVE]
    detectors = columns[0][1]
    header = "<tr><th>detector</th>" + "".join(f"<th>{escape(t)}</th>" for _, t, _ in SELECTIVE) + "</tr>"
    rows = []
    for detector in detectors:
        tds = []
        for _, _, cells in columns:
            text, best = cells[source, detector]
            tds.append(f'<td class="best"><strong>{escape(text)}</strong></td>' if best else f"<td>{escape(text)}</td>")
        rows.append(f"<tr><td>{escape(detector)}</td>{''.join(tds)}</tr>")
    return f"<table><thead>{header}</thead><tbody>{''.join(rows)}</tbody></table>"


def _table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _get(meta: Any, *path: str) -> Any:
    """``meta[path[0]][path[1]]...``, or None where run.json lacks a level (older or hand-made files)."""
    for key in path:
        if not isinstance(meta, dict):
            return None
        meta = meta.get(key)
    return meta


def _text(value: Any) -> str:
    if value is None:
        return "(unknown)"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _provenance(meta: dict[str, Any], results: pd.DataFrame) -> str:
    per_seed = [s for s in _get(meta, "per_seed") or [] if isinstance(s, dict)]
    accuracy = ", ".join(f"seed {s.get('seed')}: {s['test_accuracy']:.4f}" for s in per_seed
                         if isinstance(s.get("test_accuracy"), (int, float)))
    facts = [
        ("oodbench version", _get(meta, "oodbench_version") or ", ".join(sorted(set(results["oodbench_version"])))),
        ("torch version", _get(meta, "torch_version")),
        ("benchmark", _get(meta, "benchmark", "name")),
        ("benchmark file", _get(meta, "benchmark", "path")),
        ("benchmark sha256", _get(meta, "benchmark", "sha256") or ", ".join(sorted(set(results["benchmark_sha256"])))),
        ("seeds", _get(meta, "seeds") or sorted(set(int(s) for s in results["seed"]))),
        ("device", _get(meta, "device") or ", ".join(sorted(set(results["device"])))),
        ("classifier", " ".join(sorted(set(results["model"])) + ([f"({per_seed[0].get('model_provider')})"]
                                                                 if per_seed else []))),
        ("test accuracy", accuracy or None),
    ]
    parts = [_table(["what", "value"], [[name, _text(value)] for name, value in facts], css="text")]
    detectors = results.drop_duplicates("detector").sort_values("detector")
    parts.append("<h3>Detectors</h3>")
    parts.append(_table(["detector", "plugin", "version", "resolved options", "tuned on the source"],
                        detectors[["detector", "detector_plugin", "detector_version", "detector_options",
                                   "tuned_on_source"]].astype(str).values.tolist(), css="text"))
    if per_seed:
        parts.append("<h3>Classifier passes per seed</h3>")
        parts.append("<p>Forward and backward passes by activity (a cached run makes none).</p>")
        parts.append(_table(["seed", "passes"], [[_text(s.get("seed")), _text(s.get("passes"))] for s in per_seed],
                            css="text"))
    return "\n".join(parts)
