"""Bytes one device sends in collectives per training step, read from the program itself.

`count` walks the jaxpr of a dispatch and adds up, by the mesh axes each runs
over, what every collective (`COLLECTIVES`) makes one device send when it runs
with the bandwidth-optimal (ring) algorithm over D devices, from the bytes n
of the operands that device puts in:

    all-reduce (psum, so pmean; pmax, pmin)   2 (D - 1) / D * n
    all_gather                                (D - 1) * n
    psum_scatter (reduce_scatter), all_to_all (D - 1) / D * n
    ppermute                                  n

so collectives of every kind compare: an all-reduce of a model sends about
twice the model, gathering every device's copy of it sends D - 1 copies. One
device sends nothing (D = 1). Another algorithm (a tree, a switch's in-network
reduction) moves other bytes; these are the standard figures.

Collectives inside a `lax.cond` or `lax.switch` run only on the steps that
take their branch: the replica-averaging family's synchronisations, whose
branch index is `crossbow_jax.transformation.schedule.sync_branch` (0: no
sync; 1 + f: fragment f syncs). `count` keeps
their bytes branch by branch (`Traffic.branches`); `schedule_counts` says
how many of a run's steps take each branch, `per_step` weighs the branches
by those counts (the mean step) and `peak` takes the busiest step that ran.
A `lax.scan` counts its body `length` times; a `while` loop once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from crossbow_jax.transformation import schedule

_REDUCING = ("psum", "psum2", "psum_invariant", "unreduced_psum", "pmax", "pmin")
_GATHERING = ("all_gather", "all_gather_invariant", "all_gather_reduced")
_SCATTERING = ("reduce_scatter", "unreduced_reduce_scatter")
_MOVING = ("ppermute", "psend", "pbroadcast", "all_to_all", "ragged_all_to_all")
COLLECTIVES = frozenset(_REDUCING + _GATHERING + _SCATTERING + _MOVING)
"""The primitives counted (an async `<name>_start` counts as `<name>`; `_done` adds nothing)."""


class Traffic(NamedTuple):
    """Bytes one device sends in one step of a program, by axis label ("devices", "hosts",
    "hosts,devices", ...).

    Attributes:
        every_step: sent at every step.
        branches: sent besides on a step that takes each branch of the sync schedule's
            cond (index as `schedule.sync_branch`: 0 no sync, 1 + f fragment f); empty
            when no cond carries collectives.
    """

    every_step: dict[str, float]
    branches: tuple[dict[str, float], ...] = ()


def _label(axes: Any) -> str | None:
    names = [
        a for a in (axes if isinstance(axes, (tuple, list)) else (axes,)) if isinstance(a, str)
    ]
    return ",".join(names) if names else None


def _share(name: str, devices: int) -> float:
    """Bytes one device sends per byte it puts into collective `name` over `devices`."""
    if name in _REDUCING:
        return 2 * (devices - 1) / devices
    if name in _GATHERING:
        return devices - 1
    if name in _SCATTERING or name in ("all_to_all", "ragged_all_to_all"):
        return (devices - 1) / devices
    return 1.0 if devices > 1 else 0.0


def _sent(eqn, sizes: dict[str, int]) -> tuple[str, float] | None:
    """(axis label, bytes one device sends) of a collective over named axes, else None."""
    name = eqn.primitive.name.removesuffix("_start")
    if name not in COLLECTIVES:
        return None
    label = _label(eqn.params.get("axes", eqn.params.get("axis_name")))
    if label is None:
        return None
    devices = 1
    for axis in label.split(","):
        if axis not in sizes:
            raise ValueError(f"collective over axis {axis!r}, which the mesh {sizes} lacks")
        devices *= sizes[axis]
    # ragged_all_to_all's other operands are its output buffer and offsets
    operands = eqn.invars[:1] if name == "ragged_all_to_all" else eqn.invars
    n = float(sum(v.aval.size * v.aval.dtype.itemsize for v in operands))
    return label, n * _share(name, devices)


def _subjaxprs(value: Any):
    if hasattr(value, "eqns"):
        yield value
    elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
        yield value.jaxpr
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _subjaxprs(item)


def _add(into: dict[str, float], more: dict[str, float], times: float = 1.0) -> None:
    for key, value in more.items():
        into[key] = into.get(key, 0.0) + value * times


def _add_branches(into: list[dict[str, float]], more: list[dict[str, float]]) -> None:
    """Branch-index-wise sums: the conds that carry collectives (several in a step, or the
    same cond in each step of an unrolled program) are taken to branch on the same
    schedule, so their branch i runs on the same steps. A cond on another index (e.g.
    DiLoCo's overlap applies on `sync_branch(t - 1)`) is thus counted as if its branch
    ran with the sync it follows: the mean is off by at most the range's ends, and the
    peak is an upper bound. Only conds with collectives count at all."""
    into.extend({} for _ in range(len(more) - len(into)))
    for branch, bytes_ in zip(into, more):
        _add(branch, bytes_)


def _walk(jaxpr, times: float, sizes: dict[str, int]) -> tuple[dict[str, float], list]:
    """(bytes at every step, bytes per cond branch) of `jaxpr` run `times` times."""
    every: dict[str, float] = {}
    branches: list[dict[str, float]] = []
    for eqn in jaxpr.eqns:
        sent = _sent(eqn, sizes)
        if sent is not None:
            _add(every, {sent[0]: sent[1]}, times)
        elif eqn.primitive.name == "cond":
            totals = []
            for branch in eqn.params["branches"]:
                inner_every, inner = _walk(branch.jaxpr, times, sizes)
                # a cond nested in a branch: its busiest branch (an upper bound)
                _add(inner_every, max(inner, key=lambda b: sum(b.values()), default={}))
                totals.append(inner_every)
            if all(t == totals[0] for t in totals):  # alike in every branch: every step
                _add(every, totals[0])
            else:
                _add_branches(branches, totals)
        else:
            scan = eqn.primitive.name == "scan"
            inner_times = times * eqn.params.get("length", 1) if scan else times
            for value in eqn.params.values():
                for sub in _subjaxprs(value):
                    sub_every, sub_branches = _walk(sub, inner_times, sizes)
                    _add(every, sub_every)
                    _add_branches(branches, sub_branches)
    return every, branches


def count(jaxpr, steps: int, sizes: dict[str, int]) -> Traffic:
    """The collectives' bytes of a program of `steps` training steps, per step.

    Each cond with collectives is taken as one step's branch of the sync schedule: a
    scan's body holds the cond of its one step, an unrolled program of n steps holds n
    conds; either way the branch figures are those of one step that takes the branch.

    Args:
        jaxpr: the program's (closed) jaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`.
        steps: training steps in one run of the program.
        sizes: the mesh's axis sizes by name (`dict(mesh.shape)`).
    """
    every, branches = _walk(getattr(jaxpr, "jaxpr", jaxpr), 1.0, dict(sizes))
    per_step_ = lambda d: {k: v / steps for k, v in d.items()}
    return Traffic(per_step_(every), tuple(per_step_(b) for b in branches))


def schedule_counts(config, start: int, end: int) -> list[int]:
    """How many of the steps with t in [start, end) steps before them take each branch of
    the run's sync schedule (`schedule.branch_counts`: 0 no sync, 1 + f fragment f).

    Args:
        config: the run's `TrainConfig` (its period, fragments and sync warm-up).
        start, end: the steps' range.
    """
    return schedule.branch_counts(
        start, end, config.period, config.fragments, config.sync_warmup_steps
    )


def _branches(traffic: Traffic, counts: list[int]) -> tuple[dict[str, float], ...]:
    if not traffic.branches:
        return ({},) * len(counts)
    if len(traffic.branches) != len(counts):
        raise ValueError(
            f"the program's sync cond has {len(traffic.branches)} branches but the schedule "
            f"counts {len(counts)} ({counts}); the transformation must branch on "
            "schedule.sync_branch with the run's fragments"
        )
    return traffic.branches


def per_step(traffic: Traffic, counts: list[int]) -> dict[str, float]:
    """Mean bytes per step by axis over steps of which `counts[i]` took branch i
    (`schedule_counts`); with no steps, `traffic.every_step`."""
    out = dict(traffic.every_step)
    steps = sum(counts)
    if steps:
        for n, branch in zip(counts, _branches(traffic, counts)):
            _add(out, branch, n / steps)
    return out


def peak(traffic: Traffic, counts: list[int]) -> dict[str, float]:
    """The most bytes one device sends over each axis in one step, among the branches
    that ran (`counts[i] > 0`, `schedule_counts`): every axis's own busiest step.

    In the replica-averaging family every axis peaks on the sync steps, so the sum over
    the axes is the busiest step's total (else it bounds it from above).
    """
    out = dict(traffic.every_step)
    for n, branch in zip(counts, _branches(traffic, counts)):
        if n:
            for key, value in branch.items():
                out[key] = max(out.get(key, 0.0), traffic.every_step.get(key, 0.0) + value)
    return out
