"""Built-in benchmark definitions (TOML files beside this module)."""
from pathlib import Path

from oodbench import hookimpl


@hookimpl
def oodbench_register_benchmarks(register):
    for path in sorted(Path(__file__).parent.glob("*.toml")):
        register(path)
