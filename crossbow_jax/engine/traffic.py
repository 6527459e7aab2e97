"""Bytes all-reduced per training step, read from the program itself.

`count` walks the jaxpr of a dispatch and adds up the operands of every
all-reduce (`psum`; `pmean` is a `psum` and a division) by the mesh axes it
runs over. All-reduces inside a `lax.cond` are the replica-averaging
family's synchronisations (`crossbow_jax/transformation/_period.py`): they
run only on sync steps, so they are counted apart and weighed by how many of
the run's steps were sync steps (`per_step`). A `lax.scan` counts its body
`length` times; a `while` loop once.

The figure is the payload one device contributes to the all-reduces of a
step (e.g. SMA: the model's corrections, once per step); the bytes on the
wire depend on the all-reduce algorithm (a ring sends about twice that).
"""

from __future__ import annotations

from typing import Any, NamedTuple

ALL_REDUCE = ("psum", "psum2", "psum_invariant")


class Traffic(NamedTuple):
    """All-reduced bytes per step of one program, by axis label ("devices", "hosts", ...)."""

    every_step: dict[str, float]  # run at every step
    on_sync: dict[str, float]  # inside a cond: one synchronisation, on sync steps only


def _label(axes: Any) -> str | None:
    names = [
        a for a in (axes if isinstance(axes, (tuple, list)) else (axes,)) if isinstance(a, str)
    ]
    return ",".join(names) if names else None


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


def _walk(jaxpr, every: dict, sync: dict, times: float, in_cond: bool) -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ALL_REDUCE:
            label = _label(eqn.params.get("axes", eqn.params.get("axis_name")))
            if label is not None:
                size = sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
                _add(sync if in_cond else every, {label: float(size)}, times)
            continue
        if name == "cond":  # the branch with the most traffic: the sync
            branches = []
            for branch in eqn.params["branches"]:
                e, s = {}, {}
                _walk(branch.jaxpr, e, s, times, True)
                branches.append(s)
            _add(sync, max(branches, key=lambda b: sum(b.values()), default={}))
            continue
        inner = times * eqn.params.get("length", 1) if name == "scan" else times
        for value in eqn.params.values():
            for sub in _subjaxprs(value):
                _walk(sub, every, sync, inner, in_cond)


def count(jaxpr, steps: int) -> Traffic:
    """The all-reduce traffic of a program of `steps` training steps, per step.

    Args:
        jaxpr: the program's (closed) jaxpr, e.g. `jax.jit(f).trace(*args).jaxpr`.
        steps: training steps in one run of the program.
    """
    every: dict[str, float] = {}
    sync: dict[str, float] = {}
    _walk(getattr(jaxpr, "jaxpr", jaxpr), every, sync, 1.0, False)
    return Traffic(
        {k: v / steps for k, v in every.items()}, {k: v / steps for k, v in sync.items()}
    )


def sync_steps(start: int, end: int, period: int) -> int:
    """Sync steps among the steps with t in [start, end) updates before them."""
    return end // period - start // period


def per_step(traffic: Traffic, steps: int, syncs: int) -> dict[str, float]:
    """Bytes all-reduced per step averaged over `steps` steps of which `syncs` synchronised."""
    out = dict(traffic.every_step)
    if steps:
        _add(out, traffic.on_sync, syncs / steps)
    return out
