"""Runs a learner transformation over simulated devices for the tests.

Parameters are a two-leaf pytree; its leaves are flattened into one vector
per learner to compare with the references in `reference.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crossbow_jax.engine.mapping import DEVICE_AXIS, HOST_AXIS, device_map, make_mesh

SHAPES = {"a": (3,), "b": (2, 2)}
N = sum(int(np.prod(s)) for s in SHAPES.values())


def unflatten(flat):
    """(..., N) -> {"a": (..., 3), "b": (..., 2, 2)}."""
    lead = flat.shape[:-1]
    return {"a": flat[..., :3].reshape(lead + (3,)), "b": flat[..., 3:].reshape(lead + (2, 2))}


def flatten(tree):
    lead = tree["a"].shape[:-1]
    return np.concatenate(
        [np.asarray(tree["a"]).reshape(lead + (3,)), np.asarray(tree["b"]).reshape(lead + (4,))],
        axis=-1,
    )


def problem(k, seed=0):
    """Initial weights and a per-learner linear gradient field."""
    rng = np.random.default_rng(seed)
    w0 = rng.normal(size=N)
    s = rng.uniform(0.5, 2.0, size=(k, N))
    t = rng.normal(size=(k, N))
    return w0, s, t


def linear_grads(params, s, t):
    return jax.tree.map(lambda w, s_, t_: s_ * w - t_, params, s, t)


def _hosts_pmap(fn, hosts):
    """`fn` over (hosts * devices, ...) arrays: a pmap over hosts of a named vmap over each
    host's devices (jax 0.10 cannot nest pmaps)."""
    inner = jax.pmap(jax.vmap(fn, axis_name=DEVICE_AXIS), axis_name=HOST_AXIS)

    def run(*args):
        split = jax.tree.map(lambda x: x.reshape((hosts, -1) + x.shape[1:]), args)
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), inner(*split))

    return run


def run_mapped(make_opt, *, devices, m, steps, mapper, seed=0, hosts=1):
    """Runs `steps` updates with m learners on each of `devices` devices.

    Args:
        make_opt: axis_name -> transformation; with `hosts` > 1,
            (axis_name, host_axis) -> transformation, on a hosts x devices mesh
            (pmap: a pmap over hosts of a named vmap over a host's devices).

    Returns:
        (learner params flattened (k, N), state with a leading device axis,
         w0, s, t).
    """
    k = devices * m
    w0, s, t = problem(k, seed)
    mesh = make_mesh(jax.devices()[:devices], hosts=hosts)
    opt = make_opt(DEVICE_AXIS, HOST_AXIS) if hosts > 1 else make_opt(DEVICE_AXIS)
    as_tree = lambda a: unflatten(jnp.asarray(a, jnp.float32).reshape(devices, m, N))
    params = as_tree(np.tile(w0, (k, 1)))
    s_tree, t_tree = as_tree(s), as_tree(t)

    def step(params, state, s_, t_):
        updates, state = opt.update(linear_grads(params, s_, t_), state, params)
        return optax.apply_updates(params, updates), state

    if mapper == "pmap" and hosts > 1:
        init, step = _hosts_pmap(opt.init, hosts), _hosts_pmap(step, hosts)
    else:
        init, step = device_map(opt.init, mesh, mapper), device_map(step, mesh, mapper)
    if mapper == "shard_map":
        init, step = jax.jit(init), jax.jit(step)
    state = init(params)
    for _ in range(steps):
        params, state = step(params, state, s_tree, t_tree)
    return flatten(params).reshape(k, N), state, w0, s, t


def run_single(opt, *, m, steps, seed=0):
    """The same on one device with no mapping (axis_name=None)."""
    w0, s, t = problem(m, seed)
    params = unflatten(jnp.asarray(np.tile(w0, (m, 1)), jnp.float32))
    s_tree, t_tree = (unflatten(jnp.asarray(a, jnp.float32)) for a in (s, t))
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        updates, state = opt.update(linear_grads(params, s_tree, t_tree), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return flatten(params), state, w0, s, t


def rel_err(actual, expected):
    expected = np.asarray(expected, np.float64)
    return float(
        np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))
    )
