"""What every command pays before doing anything: building the registry imports no heavy library it does not use.

scikit-learn (which imports scipy.stats and pandas) took ~2 s of every command, the run's driver included, when
plugins imported it at module level; they import it where they fit or load. Measured in a fresh interpreter,
since this test process has imported everything already."""
import subprocess
import sys


def test_building_the_registry_imports_neither_scikit_learn_nor_scipy_stats():
    code = ("import sys; from oodbench.plugins import build_registry; build_registry(strict=True); "
            "print(sorted(m for m in ('sklearn', 'scipy.stats', 'scipy.ndimage') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
