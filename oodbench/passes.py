"""Network passes of a run, grouped and set against the minimum the run needs.

The runner counts every image it pushes through the classifier, by activity
(``run.json`` -> ``per_seed[i]["passes"]``, each ``{"forward": n, "forward_backward": n}``):
``extract:<set>`` (the outputs every detector shares), ``attack:<attack>:<eps>`` and
``detector:<label>:<fit|tune|score>``. A forward+backward pass is counted once, under
``forward_backward``; ``forward`` counts forward-only passes.

What a run needs at minimum is stated by the caller, per activity, because only the caller
knows what an attack or a detector needs by definition; the core names neither. The one
minimum the core does state is its own: the shared extraction needs one forward pass per
image of every set it extracts (``core_minimum``).
"""
from __future__ import annotations

from typing import Any, Mapping

from oodbench.classifier import FIT_BATCH_SIZE

KINDS = ("forward", "forward_backward")

Counts = Mapping[str, int]


def group_of(activity: str) -> str:
    """``extraction``, ``attacks``, ``detector:<label>``, or the activity itself (``fit-batch-size``, ``other``)."""
    kind, _, rest = activity.partition(":")
    if kind == "extract":
        return "extraction"
    if kind == "attack":
        return "attacks"
    if kind == "detector":
        # labels may hold ':' in their options, the phase never does
        return "detector:" + rest.rpartition(":")[0]
    return kind


def core_minimum(set_sizes: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """What the core's own activities need: one forward pass per image of every extracted set.

    ``set_sizes`` is keyed as the runner names sets (``test``, ``ood:x``...). The probe that
    fits batch sizes to memory (``FIT_BATCH_SIZE``) is needed by no result: its minimum is 0,
    so its few images show as excess.
    """
    least = {f"extract:{name}": {"forward": int(n), "forward_backward": 0} for name, n in set_sizes.items()}
    return {**least, FIT_BATCH_SIZE: {"forward": 0, "forward_backward": 0}}


def passes_report(passes: Mapping[str, Counts], minimum: Mapping[str, Counts]) -> dict[str, Any]:
    """Measured against minimum passes, per activity, per group (``group_of``) and in total.

    Each entry holds ``measured`` and ``minimum`` (image counts per kind) and ``ratio``
    (measured / minimum per kind, ``None`` where the minimum is 0). An activity with passes
    but no stated minimum gets ``minimum: None``, and so do its group and the total: an
    unknown minimum is reported as unknown, never as zero.
    """
    activities = {}
    for activity in sorted(set(passes) | set(minimum)):
        least = minimum.get(activity)
        activities[activity] = (_totals([passes.get(activity, {})]), None if least is None else _totals([least]))
    groups: dict[str, list[str]] = {}
    for activity in activities:
        groups.setdefault(group_of(activity), []).append(activity)
    return {
        "activities": {a: _entry(*activities[a]) for a in activities},
        "groups": {g: _entry(*_sum(activities[a] for a in members)) for g, members in sorted(groups.items())},
        "total": _entry(*_sum(activities.values())),
    }


def _totals(counts: list[Counts]) -> dict[str, int]:
    return {kind: sum(int(c.get(kind, 0)) for c in counts) for kind in KINDS}


def _sum(pairs) -> tuple[dict[str, int], dict[str, int] | None]:
    pairs = list(pairs)
    measured = _totals([m for m, _ in pairs])
    known = all(least is not None for _, least in pairs)
    return measured, _totals([least for _, least in pairs]) if known else None


def _entry(measured: dict[str, int], least: dict[str, int] | None) -> dict[str, Any]:
    ratio = None if least is None else {k: measured[k] / least[k] if least[k] else None for k in KINDS}
    return {"measured": measured, "minimum": least, "ratio": ratio}
