"""Checks of a command's input before any work: counts, seeds, device, detectors, plugins, paths.

Each raises ``ValueError`` (or the registry's ``UnknownPluginError``) with one line naming the
option or key, the value and what was expected; the CLI turns that into exit 2. They run before
any training or extraction and create nothing, so a typo costs seconds, not a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import stat
from pathlib import Path
from typing import Any

#: Seeds go to numpy, torch and scikit-learn generators, some of which take only 32-bit seeds.
SEED_LIMIT = 2**31
#: Kernel filesystems whose folders pass os.access for root but take no new files.
_KERNEL_FILESYSTEMS = {"proc", "sysfs", "cgroup", "cgroup2", "debugfs", "tracefs", "securityfs", "configfs",
                       "pstore", "bpf", "devpts", "efivarfs", "binfmt_misc", "fusectl", "mqueue"}


def check_counts(args: argparse.Namespace) -> None:
    """--seeds and --batch-size of 0 would silently mean 'the benchmark's', and negatives would run nothing."""
    for option, value, minimum in (("--seeds", args.seeds, 1), ("--batch-size", args.batch_size, 1),
                                   ("--first-seed", args.first_seed, 0)):
        if value is not None and value < minimum:
            raise ValueError(f"{option} {value}: must be an integer >= {minimum}")


def seeds(args: argparse.Namespace, bench) -> list[int]:
    n = args.seeds if args.seeds is not None else bench.seeds
    if args.first_seed + n > SEED_LIMIT:
        raise ValueError(f"--first-seed {args.first_seed} with {n} seed(s): the last seed, {args.first_seed + n - 1}, "
                         f"must be below 2**31 ({SEED_LIMIT})")
    return list(range(args.first_seed, args.first_seed + n))


def device(name: str, here: bool = True):
    """The torch device --device names, refused when torch cannot parse it or this machine has none of it.

    ``here=False`` (planning a run for other machines: ``run --plan``) only checks the name.
    """
    import torch

    from .runner import choose_device

    if name == "auto":
        return choose_device(name)
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"--device {name!r}: not a device name; expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu" or not here:
        return device
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if not callable(available) or not available():
        raise ValueError(f"--device {name}: torch sees no {device.type} device on this machine")
    count = backend.device_count() if callable(getattr(backend, "device_count", None)) else 1
    if device.index is not None and device.index >= count:
        raise ValueError(f"--device {name}: torch sees {count} {device.type} device(s), numbered from 0")
    return device


def detector_specs(registry, text: str | None, bench=None) -> list[Any]:
    """The detectors to run (every installed one when none are named); each label once, since rows are keyed by it.

    A benchmark's ``[detectors.NAME]`` options come under the command line's: ``pixelcnn`` on a benchmark
    that sets ``config = "paper"`` runs the paper's configuration, ``pixelcnn[config=small]`` the small one.
    The label stays what the user wrote; the rows' ``detector_options`` record every option that ran."""
    from .cli import parse_detectors  # the command line's syntax, kept beside the parser that documents it

    defaults = {} if bench is None else bench.detector_options
    for name, options in defaults.items():
        _check_plugin(registry, "detectors", name, options, 0, f"benchmark {bench.name}: detectors.{name}")
    specs = parse_detectors(",".join(registry.names("detectors")) if text is None else text)
    specs = [dataclasses.replace(s, options={**defaults.get(s.name, {}), **s.options}) for s in specs]
    if not specs:
        raise ValueError(f"--detectors {text!r}: no detectors to run" if text is not None else "no detectors to run")
    labels = [s.label for s in specs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"--detectors {text}: {', '.join(repeated)} given more than once; results are keyed by "
                         "the detector label, so each must be distinct (give the repeats different options)")
    check_detectors(registry, specs)
    return specs


def check_detectors(registry, specs: list[Any]) -> None:
    """Every detector is installed and takes its options: names, and values against the constructor's annotations
    (``plugins.resolve_options``: ``gmm[k=2.5]`` is refused with the option, the value and the type expected)."""
    from .plugins import resolve_options

    for spec in specs:
        resolve_options(registry.get("detectors", spec.name), spec.options)
        # Constructors only store and check their options, so building each once is cheap; a refusal found here
        # is one line and exit 2 instead of 'bad options' rows on every source of every seed.
        _check_plugin(registry, "detectors", spec.name, spec.options, 0, f"detector '{spec.label}'")


def check_plugins(registry, bench, seed: int) -> None:
    """Every plugin the benchmark names is installed and takes its options.

    Unchecked, an unknown OOD dataset or attack becomes error rows of an otherwise finished run, and an
    option of the wrong type a traceback after training. Constructors only store and check their options,
    so building each plugin once here is cheap.
    """
    idd, model = bench.in_distribution, bench.model
    uses = [("datasets", idd.plugin, idd.options, f"in_distribution dataset '{idd.plugin}'"),
            ("models", model.plugin, model.options, f"model '{model.plugin}'")]
    uses += [("datasets", ref.dataset, ref.options, f"sources.ood '{ref.name}' (dataset '{ref.dataset}')")
             for ref in bench.ood]
    uses += [("attacks", ref.plugin, ref.options, f"sources.attacks[{i}] (attack '{ref.plugin}')")
             for i, ref in enumerate(bench.attacks)]
    counts: dict[str, int] = {}
    for ref in bench.extra_sources:  # [[sources.PLUGIN]] tables: the plugin, then the image sets it asks for
        i = counts[ref.plugin] = counts.get(ref.plugin, -1) + 1
        uses.append(("sources", ref.plugin, ref.options, f"sources.{ref.plugin}[{i}] (failure source '{ref.plugin}')"))
    for kind, name, options, where in uses:
        # The runner builds models without a seed, datasets and attacks with the seed of the run.
        _check_plugin(registry, kind, name, options, None if kind == "models" else seed,
                      f"benchmark {bench.name}: {where}")
    from .plugins import instantiate
    from .runner import image_requests

    for ref in bench.extra_sources:
        for request in image_requests([instantiate(registry.get("sources", ref.plugin), ref.options, seed)]).values():
            kind, name = ("attacks", request.attack) if request.attack is not None else ("datasets", request.dataset)
            _check_plugin(registry, kind, name, request.options, seed,
                          f"benchmark {bench.name}: sources.{ref.plugin} image set '{request.name}' ({kind[:-1]} "
                          f"'{name}')")


def _check_plugin(registry, kind: str, name: str, options: dict[str, Any], seed: int | None, where: str) -> None:
    from .api import MissingDataError, PluginError
    from .plugins import OptionError, UnknownPluginError, resolve_options

    try:
        entry = registry.get(kind, name)
    except UnknownPluginError as exc:
        raise UnknownPluginError(f"{where}: {exc}") from None
    try:
        resolved = resolve_options(entry, options, seed)
    except UnknownPluginError as exc:  # an option name the constructor does not take
        raise UnknownPluginError(f"{where}: {exc}") from None
    except OptionError as exc:  # a value that contradicts the constructor's annotation
        raise ValueError(f"{where}: {exc.detail}") from None
    try:
        entry.target(**resolved)
    except MissingDataError:
        raise  # data missing from this machine is not a mistake in the benchmark: exit 1, as at run time
    except (TypeError, ValueError, PluginError) as exc:
        raise ValueError(f"{where}: options {options}: {exc}") from None
    except Exception as exc:  # a constructor that chokes on its options without saying so: still these options
        raise ValueError(f"{where}: options {options}: {type(exc).__name__}: {exc}") from None


def path_option(option: str, value: str) -> Path:
    if not value:  # Path("") is the current folder: never what an empty argument meant
        raise ValueError(f"{option}: empty; expected a path")
    return Path(value)


def cache_dir(args: argparse.Namespace) -> Path | str | None:
    """The cache folder or fsspec URL; checked now, since a bad one would otherwise fail the first store, after
    training. A URL's filesystem must be installed and the location (or the folder above it) listable."""
    from .cache import check_store, default_cache_dir, is_url

    if getattr(args, "no_cache", False):
        return None
    if args.cache_dir is not None:
        option = "--cache-dir"
        root = args.cache_dir if is_url(args.cache_dir) else path_option(option, args.cache_dir)
    else:
        option = "OODBENCH_CACHE_DIR" if os.environ.get("OODBENCH_CACHE_DIR") else "the user cache folder"
        root = default_cache_dir()
    if is_url(root):
        root = check_store(option, root)  # a file:// URL comes back as a local folder, checked as one below
    if isinstance(root, Path):
        check_writable(option, root, folder=True)
    return root


def check_writable(option: str, path: Path, folder: bool) -> None:
    """``path`` can be written at the end: as a folder (made with its parents) or as a file (via a temporary
    file beside it). An existing path must be of that kind; otherwise its nearest existing parent must be a
    writable folder and the names still to be made must fit the filesystem.
    """
    existing, mode = _nearest_existing(option, path)
    if existing == path:
        if folder != stat.S_ISDIR(mode):
            raise ValueError(f"{option} {path}: " + ("a file, expected a folder" if folder else
                                                     "a folder, expected a file name"))
        _check_takes_files(option, path, path if folder else path.parent)
        return
    if not stat.S_ISDIR(mode):
        raise ValueError(f"{option} {path}: {existing} is a file, so nothing can be made under it")
    _check_takes_files(option, path, existing)
    _check_names(option, path, existing)


def _check_takes_files(option: str, path: Path, folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: the folder {folder} is not writable")
    # os.access says yes to root everywhere, kernel filesystems included, where creating a file then fails.
    kind = _filesystem_type(folder)
    if kind in _KERNEL_FILESYSTEMS:
        raise ValueError(f"{option} {path}: the folder {folder} is on the kernel's {kind} filesystem, "
                         "which takes no new files")


def _filesystem_type(path: Path) -> str | None:
    """The type of the filesystem holding ``path``, from /proc/self/mountinfo; None where that is unknown."""
    try:
        device = path.stat().st_dev
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for line in mounts:  # "id parent major:minor root mountpoint options ... - type source options"
        fields, _, tail = line.partition(" - ")
        if fields.split()[2:3] == [wanted] and tail:
            return tail.split()[0]
    return None


def _nearest_existing(option: str, path: Path) -> tuple[Path, int]:
    """The path itself or its nearest existing parent, with its stat mode."""
    for candidate in (path, *path.parents):
        try:
            return candidate, candidate.stat().st_mode
        except OSError as exc:
            # Missing, under a file, or a name too long to exist: look further up (names are checked after).
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                raise ValueError(f"{option} {path}: cannot look at {candidate}: {exc.strerror}") from None
    raise ValueError(f"{option} {path}: no part of it exists (was the current folder removed?)")


def _check_names(option: str, path: Path, existing: Path) -> None:
    """The names still to be created fit the filesystem (else ENAMETOOLONG when the results are written)."""
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for name in path.relative_to(existing).parts:
        if len(os.fsencode(name)) > limit:
            raise ValueError(f"{option}: the name '{name[:40]}...' is {len(os.fsencode(name))} bytes long; "
                             f"names on this filesystem are at most {limit} bytes")


def export_targets(export: str | None, seeds: list[int]) -> list[Path]:
    """The files --export will write, refused before any training, not after hours of it."""
    if not export:
        return []
    try:
        paths = [Path(export.format(seed=s)) for s in seeds] if "{seed}" in export else [Path(export)]
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise ValueError(f"--export {export}: only '{{seed}}' may stand in braces ({type(exc).__name__}: {exc}); "
                         "write a literal brace twice") from None
    for path in paths:
        check_writable("--export", path, folder=False)
        if not path.parent.is_dir():
            raise ValueError(f"--export {path}: the folder {path.parent} does not exist or is not writable")
    return paths


def results_file(path: str) -> Path:
    """A results CSV named on the command line; a folder or a missing file is a usage error, not a traceback."""
    file = path_option("results file", path)
    if file.is_dir():
        raise ValueError(f"{file}: a folder, expected a results CSV file (such as {file / 'results.csv'})")
    if not file.is_file():
        raise ValueError(f"{file}: no such file")
    return file


def executor(registry, args: argparse.Namespace) -> dict[str, Any]:
    """--executor and its options, as RunOptions fields, checked by the executor itself (``Executor.check``)."""
    entry = registry.get("executors", args.executor)  # an unknown name lists the installed executors
    for option, value, minimum in (("--workers", args.workers, 1), ("--threads", args.threads, 1),
                                   ("--task-timeout", args.task_timeout, 0)):
        if value is not None and not value >= minimum:  # 'not >=' refuses NaN too
            raise ValueError(f"{option} {value:g}: must be a number >= {minimum}")
    if args.scheduler is not None and not args.scheduler.strip():
        raise ValueError("--scheduler: empty; expected an address such as tcp://HOST:8786")
    if entry.target.needs_store and getattr(args, "no_cache", False):
        raise ValueError(f"--executor {args.executor} --no-cache: its workers hand each other the shared outputs "
                         "through the store; give them one (--cache-dir)")
    chosen = {"workers": args.workers, "scheduler": args.scheduler, "task_timeout": args.task_timeout,
              "threads": args.threads}
    entry.target(**chosen).check()
    return {"executor": args.executor, **chosen}
