"""The hook specifications: the one documented contract between oodbench and its plugins.

A plugin is a module (or object) with functions marked ``@oodbench.hookimpl`` whose names
are the hooks below. oodbench finds plugins through the ``oodbench`` entry-point group, so a
package becomes a plugin by declaring, in its ``pyproject.toml``::

    [project.entry-points.oodbench]
    mydetector = "oodbench_mydetector"

Every hook receives ``register``, a callable that records plugin *classes* (never built
objects, so listing plugins stays cheap)::

    register(cls, name=None, **default_options)

``name`` defaults to ``cls.name``; ``default_options`` let one class appear under several
names (``register(GMMDetector, name="gmm-1000", k=1000)``). A name registered twice is an
error that names both providers. The classes subclass the bases in ``oodbench.api``.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("oodbench")


@hookspec
def oodbench_register_datasets(register):
    """Register ``oodbench.api.Dataset`` subclasses (in-distribution and failure-source images)."""


@hookspec
def oodbench_register_models(register):
    """Register ``oodbench.api.Model`` subclasses (architectures with a recipe or checkpoint)."""


@hookspec
def oodbench_register_attacks(register):
    """Register ``oodbench.api.Attack`` subclasses (adversarial failure sources)."""


@hookspec
def oodbench_register_sources(register):
    """Register ``oodbench.api.FailureSource`` subclasses (kinds of failure: mistakes, OOD sets, attacks, shift)."""


@hookspec
def oodbench_register_detectors(register):
    """Register ``oodbench.api.Detector`` subclasses (scores, higher = more trustworthy)."""


@hookspec
def oodbench_register_executors(register):
    """Register ``oodbench.api.Executor`` subclasses (where a run's tasks run: ``--executor NAME``)."""


@hookspec
def oodbench_register_benchmarks(register):
    """Register benchmark definition files: ``register(path)`` with a ``pathlib.Path`` to a TOML file.

    The file's ``name`` is the benchmark's name (``oodbench run --benchmark NAME``).
    """
