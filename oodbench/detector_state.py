"""A fitted detector's ``state_dict`` as plain arrays and back, never through pickle.

A stored fitted detector is a cache entry like any other (``np.savez``, read back with
``allow_pickle=False``), so a state dict must become a dict of NumPy arrays whose bytes
say everything: no object arrays, no pickled Python objects. ``to_arrays`` keeps numeric
and bool arrays as they are (dtype and shape exactly) and writes every other value, JSON
made of str, int, float, bool, None, lists and str-keyed dicts, into one 0-d unicode array
under the reserved key ``JSON_KEY``; ``from_arrays`` reverses it. What JSON cannot say is
refused up front with a ``PluginError`` naming the key, rather than changed silently:
a set, a tensor, an sklearn estimator, a dict with int keys. Tuples are accepted and come
back as lists (JSON has no tuples). Floats round-trip exactly (JSON writes ``repr``),
NaN and infinities included (as Python's json writes them).
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from .api import PluginError

#: The key under which the state's JSON values travel; a state dict may not use it.
JSON_KEY = "__json__"
#: Array kinds a state may hold: bool, signed and unsigned ints, floats, complex.
ARRAY_KINDS = "biufc"


def _check_json(value: Any, where: str) -> None:
    """Raise PluginError unless ``value`` survives ``json.dumps``/``json.loads`` (tuples as lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PluginError(f"{where}: dict key {key!r} is not a str (JSON would turn it into one)")
            _check_json(item, f"{where}[{key!r}]")
        return
    hint = " (convert it to a NumPy array)" if hasattr(value, "__array__") else ""
    raise PluginError(f"{where}: a {type(value).__module__}.{type(value).__qualname__} is neither a numeric "
                      f"array nor JSON{hint}; state is stored without pickle")


def to_arrays(state: dict[str, Any], owner: str = "detector") -> dict[str, np.ndarray]:
    """``state`` as arrays for ``np.savez``: arrays as they are, the rest as JSON under ``JSON_KEY``.

    ``owner`` names the detector in error messages. The arrays are not copied.
    """
    if not isinstance(state, dict):
        raise PluginError(f"{owner}: state_dict() must return a dict, got {type(state).__name__}")
    arrays: dict[str, np.ndarray] = {}
    values: dict[str, Any] = {}
    for key, value in state.items():
        where = f"{owner}: state_dict()[{key!r}]"
        if not isinstance(key, str) or not key:
            raise PluginError(f"{where}: keys must be non-empty strings")
        if key == JSON_KEY:
            raise PluginError(f"{where}: {JSON_KEY!r} is reserved for the state's JSON values")
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in ARRAY_KINDS:
                raise PluginError(f"{where}: arrays must be numeric or bool, got dtype {value.dtype}"
                                  + (" (object arrays need pickle)" if value.dtype.hasobject else ""))
            arrays[key] = value
        else:
            _check_json(value, where)
            values[key] = value
    arrays[JSON_KEY] = np.array(json.dumps(values, sort_keys=True))
    return arrays


def from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The state dict ``to_arrays`` made ``arrays`` from (JSON tuples come back as lists)."""
    state: dict[str, Any] = {}
    for key, value in arrays.items():
        if key == JSON_KEY:
            state.update(json.loads(str(value[()])))
        elif value.dtype.kind not in ARRAY_KINDS:
            raise PluginError(f"stored detector state {key!r} has dtype {value.dtype}, not a numeric array")
        else:
            state[key] = value
    return state

