"""The real files of ``../shared`` beside the checkout (or ``$OODBENCH_SHARED_DIR``) that the real-data tests read:
they are slow, and skipped where the files are not there."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("OODBENCH_SHARED_DIR", ROOT.parent / "shared"))


def needs_shared(files: list[str]) -> list[pytest.MarkDecorator]:
    """A test module's ``pytestmark``: slow, and skipped unless every one of ``files`` is in ``SHARED``."""
    missing = [f for f in files if not (SHARED / f).exists()]
    return [pytest.mark.slow, pytest.mark.skipif(bool(missing), reason=f"real files not in {SHARED}: {missing}")]
