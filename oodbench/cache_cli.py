"""The ``oodbench cache`` commands (verify, prune, info): parse, call the cache, print. No logic of their own.

Registered by ``oodbench.cli.build_parser`` through :func:`add_parser`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The cache module (numpy) is imported only by the commands: building the parser stays as cheap
# as the rest of 'oodbench --help'.


def _open(args: argparse.Namespace):
    """The cache at ``--cache-dir`` (a folder or an fsspec URL), refused when it is not a folder: a typo must
    not read as 'all is well'."""
    from .cache import Cache, default_cache_dir, is_url

    root = args.cache_dir or default_cache_dir()
    if isinstance(root, str) and not is_url(root):
        root = Path(root).expanduser()
    cache = Cache(root)
    cache.check_root()
    return cache


def _size(n_bytes: float) -> str:
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    while n_bytes >= 1024 and len(units) > 1:
        n_bytes /= 1024
        units.pop(0)
    return f"{n_bytes:.0f} B" if units[0] == "B" else f"{n_bytes:.1f} {units[0]}"


def cmd_cache_verify(args: argparse.Namespace) -> int:
    cache = _open(args)
    entries = cache.entries()
    damaged = 0
    for path in entries:
        reason = cache.check(path)
        if reason is None:
            continue
        damaged += 1
        print(f"{path}: {reason}" + (f"; moved to {cache.quarantine(path, reason)}" if args.fix else ""))
    fixed = "; moved to quarantine, the next run recomputes them" if args.fix and damaged else ""
    print(f"{cache.root}: {len(entries)} entries, {damaged} damaged{fixed}", file=sys.stderr)
    return 1 if damaged and not args.fix else 0


def cmd_cache_prune(args: argparse.Namespace) -> int:
    if args.older_than is not None and not args.older_than >= 0:  # 'not >=' also refuses NaN
        raise ValueError(f"--older-than must be a number of days ≥ 0, not {args.older_than}")
    cache = _open(args)
    files, n_bytes = cache.prune(args.older_than)  # a store without modification times refuses an age: exit 2
    print(f"{cache.root}: removed {files} files, {_size(n_bytes)}")
    return 0


def cmd_cache_info(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from .cache import QUARANTINE, SCRATCH

    cache = _open(args)
    usage = cache.usage()
    kinds = [k for k in usage if k not in (QUARANTINE, SCRATCH)]
    rows = [[kind, usage[kind][0], _size(usage[kind][1])] for kind in kinds]
    rows.append(["total", sum(usage[k][0] for k in kinds), _size(sum(usage[k][1] for k in kinds))])
    print(f"cache folder {cache.root}\n")
    print(tabulate(rows, headers=["kind", "entries", "size"], colalign=("left", "right", "right")))
    quarantined, q_bytes = usage.get(QUARANTINE, (0, 0))
    scratch, s_bytes = usage.get(SCRATCH, (0, 0))
    print(f"\n{quarantined} quarantined entries ({_size(q_bytes)}), {scratch} folders of work in progress in scratch/ "
          f"({_size(s_bytes)}); 'oodbench cache prune' removes both")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``cache verify|prune|info`` on ``oodbench``'s sub-command parsers."""
    cache = subparsers.add_parser("cache", help="check, clean and describe the cache",
                                  description="Check the cache's entries against their checksums, remove what "
                                  "runs no longer need, or show what it holds. Damaged entries are set aside into "
                                  "quarantine/ and recomputed by runs anyway; these commands are for looking and "
                                  "for freeing space.")
    actions = cache.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check every entry; exit 1 if one is damaged",
                                description="Read every entry, check its bytes against its checksum file and its "
                                "arrays against their recorded shapes and dtypes, and print each damaged one with "
                                "the reason; exit 1 if any, unless --fix set them aside.")
    verify.add_argument("--fix", action="store_true", help="move damaged entries into quarantine/ (the next run "
                        "recomputes them)")
    verify.set_defaults(func=cmd_cache_verify)
    prune = actions.add_parser("prune", help="delete quarantined entries, unfinished work and old entries",
                               description="Delete quarantine/, scratch/ (resume state of interrupted trainings) "
                               "and temporary files of writes that died; with --older-than, also entries no run "
                               "wrote or read for that many days. Run it while no run uses the cache.")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="also delete entries unused for DAYS days")
    prune.set_defaults(func=cmd_cache_prune)
    info = actions.add_parser("info", help="entries and bytes per kind, quarantined entries, folder",
                              description="Show the cache folder, its entries and bytes per kind (model, "
                              "outputs, attack, scores, ...), and what quarantine/ and scratch/ hold.")
    info.set_defaults(func=cmd_cache_info)
    for action in (verify, prune, info):
        action.add_argument("--cache-dir", help="cache folder or fsspec URL such as s3://bucket/oodbench (default: "
                            "the user cache dir, or OODBENCH_CACHE_DIR)")
