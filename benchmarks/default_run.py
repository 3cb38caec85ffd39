"""Cold wall time of the README's default run, as a user meets it: a fresh process, nothing cached.

Times ``oodbench run --no-cache`` (imports included) for the README's detectors (gmm, odin) and
for every installed detector, on the offline default benchmark, and writes the figures with the
machine they were measured on::

    python benchmarks/default_run.py --out default-run.json [--repeats 1]

Targets: under 60 s with every built-in detector on an idle 2-core machine (issue #16, when there were 17);
under 60 s with every detector but the pixel-space likelihood models PixelCNN++ and the pixel VAE
(``all-but-pixel-models``, issue #21; ``all-but-pixelcnn`` keeps the pixel VAE). No
assertion on time: the figures go to BENCHMARKS.md with the load average measured beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from oodbench.provenance import environment

#: The pixel-space likelihood models, which train on images rather than read the shared outputs.
PIXEL_MODELS = ("pixelcnn", "pixel-vae")


def _every_detector_but(excluded: tuple[str, ...]):
    def args() -> list[str]:
        from oodbench.plugins import build_registry

        return ["--detectors", ",".join(n for n in build_registry().names("detectors") if n not in excluded)]
    return args


CASES = {"readme": lambda: ["--detectors", "gmm,odin"], "every-detector": lambda: [],
         # issue 21's budget: every installed detector but the pixel-space likelihood models
         "all-but-pixel-models": _every_detector_but(PIXEL_MODELS),
         "all-but-pixelcnn": _every_detector_but(("pixelcnn",))}


def oodbench_command() -> list[str]:
    found = shutil.which("oodbench")
    return [found] if found else [sys.executable, "-m", "oodbench.cli"]


def time_case(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "out"
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run([*oodbench_command(), "run", "--no-cache", "-q", "-o", str(out), *args],
                              capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"oodbench run {' '.join(args)} failed:\n{done.stderr}")
        run = json.loads((out / "run.json").read_text())
        return {"process_seconds": seconds, "run_seconds": run["wall_seconds"], "load_average_before": load_before,
                "detectors": len(run["detectors"]), "rows": sum(1 for _ in open(out / "results.csv")) - 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="default-run.json", help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case (the smallest time is the figure)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated among {', '.join(CASES)}")
    args = parser.parse_args(argv)
    results = {}
    for name in args.cases.split(","):
        runs = [time_case(CASES[name]()) for _ in range(args.repeats)]
        best = min(runs, key=lambda r: r["process_seconds"])
        results[name] = {**best, "all_process_seconds": [r["process_seconds"] for r in runs]}
        print(f"{name}: {best['process_seconds']:.1f} s in a fresh process ({best['run_seconds']:.1f} s inside the run; "
              f"{best['detectors']} detectors, {best['rows']} rows; load average before {best['load_average_before']:.2f})")
    Path(args.out).write_text(json.dumps({"cases": results, "environment": environment()}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
