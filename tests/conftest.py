"""The core's suite: the fixtures every folder shares are in the repository's root ``conftest.py``; these are the
core's own."""
import pytest
from fake_plugins import fake_registry as _fake_registry


@pytest.fixture(scope="session")
def fakes():
    """A registry with the fake plugins of ``fake_plugins/`` (the ``fake`` benchmark and misbehaving sources)."""
    return _fake_registry()
