"""The ``oodbench`` command: parse, call the core, print. No logic of its own."""
from __future__ import annotations

import argparse
import ast
import errno
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from . import __version__, preflight
from .cache_cli import add_parser as add_cache_parser
from .metrics import METRICS

EXIT_USAGE = 2
#: 128 + SIGPIPE: what a shell reports for a tool that its reader stopped reading (``... | head``).
EXIT_BROKEN_PIPE = 141
#: OSErrors that mean a path given by the user is wrong (exit 2), not that the machine failed (exit 1).
_BAD_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
                    errno.ENAMETOOLONG, errno.EEXIST, errno.ELOOP, errno.EINVAL}


def parse_detectors(text: str) -> list[Any]:
    """``"gmm[k=10,tol=1e-4],odin"`` -> DetectorSpecs. Values are Python literals, else strings."""
    from .runner import DetectorSpec

    specs, depth, current = [], 0, ""
    for char in text + ",":
        if char == "," and depth == 0:
            item = current.strip()
            current = ""
            if not item:
                continue
            name, _, rest = item.partition("[")
            options: dict[str, Any] = {}
            if rest:
                if not rest.endswith("]"):
                    raise ValueError(f"detector '{item}': options must end with ']'")
                for pair in _split_top(rest[:-1]):
                    key, eq, value = pair.partition("=")
                    if not eq or not key.strip():
                        raise ValueError(f"detector '{item}': expected key=value, got '{pair}'")
                    options[key.strip()] = _literal(value.strip())
            label = name.strip() + ("[" + ",".join(f"{k}={options[k]}" for k in sorted(options)) + "]" if options else "")
            specs.append(DetectorSpec(label, name.strip(), options))
            continue
        depth += {"[": 1, "]": -1, "(": 1, ")": -1}.get(char, 0)
        current += char
    if depth:  # the last item swallowed every comma after the stray bracket
        item = current[:-1].strip()
        raise ValueError(f"detector '{item}': unbalanced brackets; write options as name[key=value,...]")
    return specs


def _split_top(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text + ",":
        if char == "," and depth == 0:
            if current.strip():
                parts.append(current.strip())
            current = ""
            continue
        depth += {"[": 1, "]": -1, "(": 1, ")": -1}.get(char, 0)
        current += char
    return parts


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _registry(args: argparse.Namespace):
    from .plugins import build_registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = build_registry(strict=args.strict_plugins or None)
    for problem in registry.problems:
        print(f"oodbench: warning: {problem}", file=sys.stderr)
    del caught
    return registry


def _find_benchmark(registry, name_or_path: str | None):
    from .benchmark import load_benchmark

    if name_or_path and (name_or_path.endswith(".toml") or os.sep in name_or_path):
        return load_benchmark(Path(name_or_path))
    if name_or_path is None:
        for name in registry.names("benchmarks"):
            bench = load_benchmark(registry.get("benchmarks", name).target)
            if bench.default:
                return bench
        raise ValueError("no default benchmark installed; name one with --benchmark")
    return load_benchmark(registry.get("benchmarks", name_or_path).target)


# -- checks made before any work ---------------------------------------------------------
# Bad input must fail in the first seconds with one line, not after hours of training or as error rows
# of a finished run. None of these checks creates anything: a refused command leaves no trace.

def cmd_run(args: argparse.Namespace) -> int:
    from .leaderboard import pivot_table, results_frame, write_run
    from .runner import RunOptions, run_benchmark

    preflight.check_counts(args)
    # A plan may be made on a login node for GPU workers: it needs the device's name, not the device.
    device = preflight.device(args.device, here=not args.plan or args.device == "auto")
    registry = _registry(args)
    bench = _find_benchmark(registry, args.benchmark)
    specs = preflight.detector_specs(registry, args.detectors, bench)
    seeds = preflight.seeds(args, bench)
    preflight.check_plugins(registry, bench, seeds[0])
    out = preflight.path_option("--out", args.out) if args.out is not None else Path("oodbench-results") / bench.name
    preflight.check_writable("--out", out, folder=True)
    opts = RunOptions(
        benchmark=bench, detectors=specs, seeds=seeds, cache_dir=_absolute(preflight.cache_dir(args)),
        # absolute: a worker on another machine or in another folder must find the same files
        data_dir=Path(args.data_dir).expanduser().absolute(), device=device,
        batch_size=args.batch_size, progress=not args.quiet, bf16=args.bf16, channels_last=args.channels_last,
        **preflight.executor(registry, args),
    )
    if args.plan:
        return _print_plan(opts, registry)
    if (args.bf16 or args.channels_last) and opts.device.type != "cuda" and not args.quiet:
        print(f"oodbench: --bf16/--channels-last are GPU options; on {opts.device} the run stays plain fp32",
              file=sys.stderr)
    result = run_benchmark(opts, registry)
    files = write_run(out, result.rows, result.timings, result.meta, result.scores, benchmark_file=bench.path)
    frame = results_frame(result.rows)
    if not args.quiet:
        accuracy = ", ".join(f"{m['test_accuracy']:.3f}" for m in result.meta["per_seed"])
        print(f"{bench.name}: {bench.model.plugin}, test accuracy {accuracy}; "
              f"{len(specs)} detectors x {frame['source'].nunique()} sources x {len(seeds)} seed(s); "
              f"{result.meta['wall_seconds']:.1f} s")
        print(f"\n{args.metric} (mean ± std over seeds; best per source in bold)\n")
        print(pivot_table(frame, args.metric))
    errors = frame[frame["status"] != "ok"]
    for _, row in errors.drop_duplicates(["detector", "error"]).iterrows():
        print(f"oodbench: {row['detector']} on {row['source']} (seed {row['seed']}): {row['error']}", file=sys.stderr)
    print(f"\nwrote {files['results']} and {files['summary']} ({len(frame)} rows, {len(errors)} errors)")
    if args.report:
        _report(out, out / "report.html")
    return 1 if (args.strict and len(errors)) else 0


def _absolute(path):
    """A local folder made absolute; a store URL (``s3://...``) or None as it is."""
    return path.expanduser().absolute() if isinstance(path, Path) else path


def _print_plan(opts, registry) -> int:
    from tabulate import tabulate

    from .cache import Cache
    from .plan import in_store, make_plan
    from .tasks import Job

    tasks = make_plan(Job(opts, registry))
    done = in_store(tasks, Cache(opts.cache_dir)) if opts.cache_dir is not None else [False] * len(tasks)
    kinds: dict[str, list] = {}
    finished: dict[str, int] = {}
    for task, was_done in zip(tasks, done):
        kinds.setdefault(task.kind, []).append(task)
        finished[task.kind] = finished.get(task.kind, 0) + was_done
    print(f"{opts.benchmark.name}: {len(opts.detectors)} detectors x {len(opts.seeds)} seed(s) -> {len(tasks)} tasks "
          f"on executor '{opts.executor}'")
    print(tabulate([[kind, len(group), finished[kind],
                     ", ".join(f"{k}={v:g}" for k, v in group[0].resources.items()) or "CPU",
                     ", ".join(t.label for t in group[:3]) + (", ..." if len(group) > 3 else "")]
                    for kind, group in kinds.items()], headers=["kind", "tasks", "finished before", "resources", "e.g."]))
    print("(a task finished before runs again and reads its outputs from the store)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    from .cache import atomic_write
    from .runner import RunOptions, train_classifiers

    preflight.check_counts(args)
    device = preflight.device(args.device)
    registry = _registry(args)
    bench = _find_benchmark(registry, args.benchmark)
    seeds = preflight.seeds(args, bench)
    preflight.check_plugins(registry, bench, seeds[0])
    exports = preflight.export_targets(args.export, seeds)
    opts = RunOptions(
        benchmark=bench, detectors=[], seeds=seeds, cache_dir=preflight.cache_dir(args),
        data_dir=Path(args.data_dir).expanduser(), device=device, batch_size=args.batch_size, progress=not args.quiet,
    )
    trained = train_classifiers(opts, registry)
    rows = [[t["seed"], t["model"], f"{t['test_accuracy']:.4f}", "cache" if t["cached"] else f"{t['seconds']:.1f} s",
             t["file"]] for t in trained]
    print(tabulate(rows, headers=["seed", "model", "test accuracy", "from", "weights"]))
    if exports and "{seed}" in args.export:
        for t, path in zip(trained, exports):  # both in the order of `seeds`
            atomic_write(path, lambda f, state=t["state_dict"]: torch.save({"state_dict": state}, f))
            print(f"wrote {path} (a state dict: give it to the model's 'checkpoint' option where it has one)")
    elif exports:
        # One file for every seed: what a benchmark ships so that each seed's classifier is the same everywhere.
        bundle = {"seeds": {str(t["seed"]): t["state_dict"] for t in trained}}
        atomic_write(exports[0], lambda f: torch.save(bundle, f))
        print(f"wrote {exports[0]} (seeds {', '.join(bundle['seeds'])}; sha256 {_sha256(exports[0])}: "
              "give both to the model's 'weights'/'weights_sha256' options where it has them)")
    return 0


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _report(run_dir: Path, out: Path) -> None:
    from .report import write_report

    try:
        plots = write_report(run_dir, out)
    except OSError as exc:
        raise ValueError(f"cannot write the report: {exc}") from None
    print(f"wrote {out}" + (f" and {len(plots)} plot files under {out.parent / 'plots'}" if plots else " (no plots)"))


def cmd_report(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    _report(run_dir, Path(args.out) if args.out else run_dir / "report.html")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .plugins import KINDS, option_infos

    registry = _registry(args)
    kinds = [args.kind] if args.kind else list(KINDS)
    if args.json:
        out = {kind: [{"name": e.name, "summary": e.summary, "provider": e.provider,
                       "provider_version": e.provider_version, "defaults": e.defaults,
                       "options": [{"name": o.name, "type": o.type or None, "default": o.default,
                                    "required": o.required, "description": o.description} for o in option_infos(e)]}
                      for e in (registry.get(kind, n) for n in registry.names(kind))] for kind in kinds}
        out["problems"] = registry.problems
        print(json.dumps(out, indent=2, default=str))
        return 0
    for kind in kinds:
        entries = [registry.get(kind, n) for n in registry.names(kind)]
        print(f"{kind} ({len(entries)})")
        if not args.verbose:
            rows = [(e.name, f"{e.provider} {e.provider_version}", e.summary) for e in entries]
            print(tabulate(rows, headers=["name", "provided by", "description"], tablefmt="simple",
                           maxcolwidths=[None, None, 80]))
            print()
            continue
        print()
        for e in entries:  # each plugin with its options: what goes in brackets or a benchmark's options table
            print(f"{e.name} ({e.provider} {e.provider_version}): {e.summary}")
            options = option_infos(e)
            if options:
                table = tabulate([(o.name, o.type or "-", "(required)" if o.required else _shown(o.default),
                                   o.description) for o in options],
                                 headers=["option", "type", "default", "description"], tablefmt="simple",
                                 maxcolwidths=[None, 30, 30, 70], disable_numparse=True)
                print("\n".join("    " + line for line in table.splitlines()))
            elif kind != "benchmarks":
                print("    no options")
            print()
    return 0


def _shown(value: Any) -> str:
    """An option's default as a user would write it in brackets or TOML."""
    plain = isinstance(value, (str, bool, type(None), list, tuple, dict))
    return json.dumps(value, default=str) if plain else repr(value)


def cmd_leaderboard_validate(args: argparse.Namespace) -> int:
    from .leaderboard import read_results, validate_frame

    files = [preflight.results_file(path) for path in args.files]  # a folder or a typo is a usage error: exit 2
    failed = False
    for path in files:
        try:
            problems = validate_frame(read_results(path), str(path))
        except ValueError as exc:
            problems = [str(exc)]
        except OSError as exc:  # present but unreadable (permissions): a problem of this file
            problems = [f"{path}: cannot read: {exc.strerror or exc}"]
        for problem in problems:
            print(problem)
        print(f"{path}: {'ok' if not problems else f'{len(problems)} problem(s)'}", file=sys.stderr)
        failed |= bool(problems)
    return 1 if failed else 0


def cmd_leaderboard_merge(args: argparse.Namespace) -> int:
    from .leaderboard import merge_frames, read_valid_results, write_results_csv

    out = preflight.path_option("--out", args.out)
    preflight.check_writable("--out", out, folder=False)
    frames = [read_valid_results(path) for path in map(preflight.results_file, args.files)]
    merged = merge_frames(frames, args.prefer)
    write_results_csv(out, merged)
    print(f"wrote {out} ({len(merged)} rows from {len(frames)} files)")
    return 0


def cmd_leaderboard_verify(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .leaderboard import results_frame
    from .runner import RunOptions, run_benchmark
    from .verify import compare, load_published, parse_filters, parse_tolerances, rerun_specs

    tolerances = parse_tolerances(args.tolerance)
    device = preflight.device(args.device)
    published = load_published(Path(args.folder), parse_filters(args.rows))
    registry = _registry(args)
    specs, seeds = rerun_specs(published)
    preflight.check_detectors(registry, specs)
    preflight.check_plugins(registry, published.benchmark, seeds[0])
    opts = RunOptions(
        benchmark=published.benchmark, detectors=specs, seeds=seeds, cache_dir=preflight.cache_dir(args),
        data_dir=Path(args.data_dir).expanduser(), device=device, progress=not args.quiet,
    )
    print(f"verifying {len(published.rows)} rows of {args.folder} ({len(specs)} detectors, seeds "
          f"{', '.join(map(str, seeds))}) against a re-run of {published.benchmark.path}", file=sys.stderr)
    result = run_benchmark(opts, registry)
    table = compare(published.rows, results_frame(result.rows), tolerances, args.metric)
    shown = table if args.all else table[~table["holds"] | (table["difference"] > 0)]
    if len(shown):
        print(tabulate([[r.detector, r.source, r.seed, f"{r.published:.6f}", f"{r.new:.6f}",
                         "" if r.difference != r.difference else f"{r.difference:.2g}", f"{r.tolerance:g}",
                         "ok" if r.holds else f"FAIL: {r.why}"] for r in shown.itertuples()],
                       headers=["detector", "source", "seed", f"published {args.metric}", "new", "|Δ|", "tolerance",
                                "verdict"], disable_numparse=True))
    failed = int((~table["holds"]).sum())
    exact = int((table["difference"] == 0).sum())
    worst = table["difference"].max()
    print(f"\n{len(table) - failed} of {len(table)} rows hold ({exact} exactly; largest |Δ| "
          f"{0.0 if worst != worst else worst:.2g}); tolerances: "
          + ", ".join(f"{k} {v:g}" for k, v in tolerances.items()))
    return 1 if failed else 0


def cmd_purify(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .api import PluginError
    from .cache import Cache, atomic_write
    from .progress import Progress
    from .purification import (SOURCE_HEADERS, density_detectors, frame, grid, parse_floats, seed_rows,
                               summary)
    from .runner import DetectorSpec, RunOptions, SeedWork
    from .verify import load_published

    if args.steps < 1:
        raise ValueError(f"--steps {args.steps}: must be an integer >= 1")
    settings = grid(parse_floats("--lr", args.lr, 0.0, inclusive=False),
                    parse_floats("--nu", args.nu, 0.0, inclusive=True), args.steps)
    folder = Path(args.run_dir)
    out = preflight.path_option("--out", args.out) if args.out else folder / "purification.csv"
    preflight.check_writable("--out", out, folder=False)
    device = preflight.device(args.device)
    published = load_published(folder)
    registry = _registry(args)
    candidates = density_detectors(registry, published.detectors)
    if args.detector is None and not candidates:
        raise ValueError(f"{folder}: none of the run's detectors ({', '.join(published.detectors)}) offers a "
                         "feature density (Detector.log_density) to purify with; run one that does, e.g. the "
                         "feature-GMM paper's mixture")
    label = args.detector or candidates[0]
    if label not in candidates:
        why = "is not one of the run's detectors" if label not in published.detectors else \
            "offers no feature density (Detector.log_density)"
        raise ValueError(f"--detector {label}: {why}; the run's detectors with one: {', '.join(candidates) or 'none'}")
    spec = DetectorSpec(label, *published.detectors[label])
    preflight.check_detectors(registry, [spec])
    seeds = sorted({int(s) for s in published.rows["seed"]})
    preflight.check_plugins(registry, published.benchmark, seeds[0])
    opts = RunOptions(benchmark=published.benchmark, detectors=[spec], seeds=seeds,
                      cache_dir=_absolute(preflight.cache_dir(args)), data_dir=Path(args.data_dir).expanduser(),
                      device=device, progress=not args.quiet)
    cache, progress = Cache(opts.cache_dir), Progress(enabled=not args.quiet)
    rows = []
    for seed in seeds:
        with progress.status(f"purification, seed {seed}") as say:
            try:
                rows += seed_rows(SeedWork(opts, registry, cache, progress, seed), spec, settings, say)
            except PluginError:
                raise
            except Exception as exc:  # a plugin's own error (the density, the classifier): one line, not a traceback
                raise PluginError(f"purify with {label}, seed {seed}: {type(exc).__name__}: {exc}") from exc
    table = frame(rows)
    atomic_write(out, lambda f: table.to_csv(f, index=False, float_format="%.6g"), mode="w")
    headers, setting_rows, source_rows = summary(table)
    print(f"feature purification with {label} ({len(settings)} settings x {len(seeds)} seed(s), "
          f"{settings[0].steps} steps each; the feature-GMM paper's Appendix B)\n")
    print(tabulate(setting_rows, headers=headers, disable_numparse=True))
    if source_rows:
        print(f"\nper failure source, at the setting of best val accuracy (counts summed over seeds)\n")
        print(tabulate(source_rows, headers=SOURCE_HEADERS, disable_numparse=True))
    print(f"\nwrote {out} ({len(table)} rows)")
    return 0


def cmd_leaderboard_show(args: argparse.Namespace) -> int:
    from .leaderboard import pivot_table, read_valid_results

    print(pivot_table(read_valid_results(preflight.results_file(args.file)), args.metric, args.format))
    return 0


def _add_rerun_options(parser: argparse.ArgumentParser) -> None:
    """The options of a command that re-runs (or reads back) a run folder's work: data, cache, device, quiet."""
    parser.add_argument("--data-dir", default=os.environ.get("OODBENCH_DATA_DIR", "."),
                        help="folder relative data paths are read from (default . or OODBENCH_DATA_DIR)")
    parser.add_argument("--cache-dir", help="cache folder (default: the user cache dir, or OODBENCH_CACHE_DIR)")
    parser.add_argument("--no-cache", action="store_true", help="recompute everything and store nothing")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, ...")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oodbench",
        description="Run every failure detector against every failure source (mistakes, adversarial, "
                    "out-of-distribution) and write leaderboard CSVs.",
    )
    parser.add_argument("--version", action="version", version=f"oodbench {__version__}")
    parser.add_argument("--strict-plugins", action="store_true",
                        help="treat a plugin that fails to load as an error (also OODBENCH_STRICT_PLUGINS=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a benchmark", description="Run detectors on a benchmark and write "
                         "results.csv (one row per detector, source, seed), summary.csv, timings.csv and run.json.")
    run.add_argument("--detectors", "-d", help="comma-separated detector names, options in brackets: "
                     "'gmm[k=10],odin' (default: every installed detector)")
    run.add_argument("--benchmark", "-b", help="benchmark name or path to a .toml file (default: the installed "
                     "default benchmark, offline digits)")
    run.add_argument("--seeds", type=int, help="number of seeds (default: the benchmark's)")
    run.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+N-1 (default 0)")
    run.add_argument("--out", "-o", help="output folder (default ./oodbench-results/BENCHMARK)")
    run.add_argument("--cache-dir", help="cache folder (default: the user cache dir, or OODBENCH_CACHE_DIR)")
    run.add_argument("--no-cache", action="store_true", help="recompute everything and store nothing")
    run.add_argument("--data-dir", default=os.environ.get("OODBENCH_DATA_DIR", "."),
                     help="folder relative data paths are read from (default . or OODBENCH_DATA_DIR)")
    run.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    run.add_argument("--batch-size", type=int, help="most images per classifier pass (default: the benchmark's); lowered "
                     "automatically to what free memory holds")
    run.add_argument("--bf16", action="store_true", help="GPU only: classifier passes (features, attacks, input "
                     "gradients) under bfloat16 autocast, outputs kept float32; ignored on CPU")
    run.add_argument("--channels-last", action="store_true", help="GPU only: channels-last memory format for "
                     "the classifier; ignored on CPU")
    run.add_argument("--executor", default="local", help="where tasks run: local (default: one task at a time in a "
                     "worker process, a crashing or hanging plugin costs only its task), inline (this process), dask, "
                     "or a plugin's; see 'oodbench list'")
    run.add_argument("--workers", type=int, help="dask: start a LocalCluster of N worker processes (default 2)")
    run.add_argument("--scheduler", help="dask: address of a running scheduler (tcp://HOST:8786) instead")
    run.add_argument("--task-timeout", type=float, help="local: seconds a task may run before it is stopped and its "
                     "rows become errors (default 86400; 0 = no limit)")
    run.add_argument("--threads", type=int, help="torch threads of every task (default: torch's in a local worker, "
                     "cores / workers on a Dask LocalCluster); rows are byte-identical across executors at equal "
                     "--threads")
    run.add_argument("--plan", action="store_true", help="print the run's tasks (per kind, resources) and exit; "
                     "loads no data")
    run.add_argument("--metric", default="auroc", help="metric of the printed table (default auroc)")
    run.add_argument("--strict", action="store_true", help="exit 1 if any row is an error")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress display and no table")
    run.add_argument("--report", action="store_true", help="also write report.html and the plots (plots/) into "
                     "the output folder, as 'oodbench report' does")
    run.set_defaults(func=cmd_run)

    train = sub.add_parser("train", help="train (or load) a benchmark's classifier into the cache",
                           description="Train the benchmark's classifier with its plugin's recipe, once per seed, "
                           "into the cache that 'oodbench run' reads (a run then starts from these weights), and "
                           "print each seed's test accuracy. Cached weights are reused, not retrained.")
    train.add_argument("--benchmark", "-b", help="benchmark name or .toml file (default: the installed default)")
    train.add_argument("--seeds", type=int, help="number of seeds (default: the benchmark's)")
    train.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+N-1 (default 0)")
    train.add_argument("--cache-dir", help="cache folder (default: the user cache dir, or OODBENCH_CACHE_DIR)")
    train.add_argument("--data-dir", default=os.environ.get("OODBENCH_DATA_DIR", "."),
                       help="folder relative data paths are read from (default . or OODBENCH_DATA_DIR)")
    train.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    train.add_argument("--batch-size", type=int, help="batch size of the accuracy pass (default: the benchmark's)")
    train.add_argument("--export", metavar="FILE", help="also save the weights: one state dict per seed when FILE "
                       "holds '{seed}' (replaced by the seed), else one file with every seed's")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    train.set_defaults(func=cmd_train)

    report = sub.add_parser("report", help="write an HTML report of a run folder",
                            description="Write one self-contained HTML page about a run folder: AUROC, FPR at 95% "
                            "TPR and Mann-Whitney U tables, ROC and precision-recall curves and score histograms "
                            "per failure source, failed rows and provenance. The plots are also written as PNG and "
                            "SVG files under plots/ next to the page. Needs results.csv; without scores.npz the "
                            "page has the tables only.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="folder written by 'oodbench run' (holds results.csv)")
    report.add_argument("--out", "-o", metavar="FILE", help="HTML file to write (default RUN_DIR/report.html)")
    report.set_defaults(func=cmd_report)

    board = sub.add_parser("leaderboard", help="validate, merge and show leaderboard CSVs",
                           description="Work with results.csv files (schema: leaderboards/README.md).")
    board_sub = board.add_subparsers(dest="action", required=True)
    validate = board_sub.add_parser("validate", help="check files against the schema; exit 1 on any problem")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=cmd_leaderboard_validate)
    merge = board_sub.add_parser("merge", help="combine results of several runs into one file")
    merge.add_argument("files", nargs="+")
    merge.add_argument("--out", "-o", required=True, help="merged results CSV to write")
    merge.add_argument("--prefer", choices=["first", "last"], help="which file wins when rows conflict "
                       "(default: refuse conflicts)")
    merge.set_defaults(func=cmd_leaderboard_merge)
    verify = board_sub.add_parser(
        "verify", help="re-run a published folder's rows and check they hold within tolerances",
        description="Re-run the rows of a published folder (results.csv, run.json, benchmark.toml) from its own "
        "benchmark file, whose sha256 must be the one the rows name, with the run's detectors and options; print "
        "per row the published value, the new one and |Δ|; exit 1 if any row moves more than its tolerance. "
        "Default tolerances (absolute): mistakes and ood 0.005, adversarial 0.02 (FGSM/BIM follow gradient signs, "
        "which rounding can flip).")
    verify.add_argument("folder", metavar="FOLDER")
    verify.add_argument("--rows", action="append", metavar="COLUMN=GLOB", help="only rows whose COLUMN (detector, "
                        "source, seed, source_kind) matches GLOB; repeat to narrow further: --rows detector=msp "
                        "--rows 'source=ood:*'")
    verify.add_argument("--tolerance", action="append", metavar="[KIND=]T", help="absolute tolerance for every "
                        "kind, or for one kind (mistakes, ood, adversarial); repeatable")
    verify.add_argument("--metric", default="auroc", choices=["auroc", "aupr_in", "aupr_out", "fpr_at_95tpr",
                                                              "detection_error"])
    verify.add_argument("--all", action="store_true", help="print every row, not only those that moved")
    _add_rerun_options(verify)
    verify.set_defaults(func=cmd_leaderboard_verify)
    show = board_sub.add_parser("show", help="detectors x sources table of one metric, mean ± std over seeds")
    show.add_argument("file")
    show.add_argument("--metric", default="auroc", choices=METRICS)
    show.add_argument("--format", default="github", choices=["github", "markdown", "csv", "html"])
    show.set_defaults(func=cmd_leaderboard_show)

    purify = sub.add_parser(
        "purify", help="feature purification (the feature-GMM paper's Appendix B) on a run folder",
        description="Move each labelled input's penultimate features down the gradient of their bits per dimension "
        "under a run's fitted feature density, plus nu ||F - F_ref||^2 (F := F - eta (grad BPD + 2 nu (F - F_ref)), "
        "STEPS steps), classify them again with the network's final layer, and write purification.csv into the run "
        "folder: per seed and setting the accuracy before and after on val, test, the attacked and the shifted sets, "
        "and per failure source how many failures it fixes and trustworthy inputs it breaks. Reads the run's "
        "classifier, outputs and fitted detector from the cache (fits what is missing). The default grid is the "
        "paper's Table 4.")
    purify.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (results.csv, run.json, benchmark.toml)")
    purify.add_argument("--detector", help="the run's detector whose density to use (default: the first of the "
                        "run's detectors that offers one, e.g. gmm)")
    purify.add_argument("--lr", default="0.1,0.01", help="learning rates eta, comma-separated (default 0.1,0.01)")
    purify.add_argument("--nu", default="0,0.01,0.1,1", help="weights nu of the distance to the original features, "
                        "comma-separated (default 0,0.01,0.1,1)")
    purify.add_argument("--steps", type=int, default=100, help="gradient steps (default 100, the paper's)")
    purify.add_argument("--out", "-o", help="CSV to write (default RUN_DIR/purification.csv)")
    _add_rerun_options(purify)
    purify.set_defaults(func=cmd_purify)

    lst = sub.add_parser("list", help="list installed plugins", description="List every dataset, model, attack, "
                         "failure source, detector, executor and benchmark that installed plugins provide, with the providing distribution.")
    lst.add_argument("kind", nargs="?", choices=["datasets", "models", "attacks", "sources", "detectors", "executors",
                                                      "benchmarks"])
    lst.add_argument("--verbose", "-v", action="store_true", help="each plugin's options: type, default and "
                     "description (from the constructor's annotations and the docstring's 'Options:' paragraph)")
    lst.add_argument("--json", action="store_true", help="machine-readable output, options included")
    lst.set_defaults(func=cmd_list)
    add_cache_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .api import PluginError
    from .benchmark import BenchmarkError
    from .plugins import PluginLoadError, UnknownPluginError

    # Warnings (a cache entry set aside, a plugin's) as one line each, like our errors, without Python's source line.
    warnings.formatwarning = lambda message, category, *_, **__: f"oodbench: warning: {message}\n"
    args = build_parser().parse_args(argv)
    if args.command == "run" and args.metric not in METRICS:
        print(f"oodbench: error: --metric {args.metric}: unknown metric; expected one of {', '.join(METRICS)}",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader gone away shows here, in the handler below, not as a warning at exit
        return code
    except BrokenPipeError:
        # The reader stopped reading (`oodbench leaderboard show F | head -1`): nothing went wrong here. Exit
        # as a tool killed by SIGPIPE does (141), so that `set -o pipefail` treats us like any other tool, and
        # point stdout at devnull so that the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (UnknownPluginError, BenchmarkError, ValueError, PluginLoadError) as exc:
        print(f"oodbench: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PluginError as exc:
        print(f"oodbench: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a path the checks could not foresee (e.g. a pseudo-filesystem that refuses writes)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"oodbench: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_USAGE if exc.errno in _BAD_PATH_ERRNOS else 1
    except KeyboardInterrupt:
        print("oodbench: interrupted; finished tasks are cached, run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
