"""One device axis, two mappers: `jax.shard_map` (default) and `jax.pmap`.

Everything the engine maps over devices carries an explicit leading device
axis in its global shape: parameters are `(devices, learners, ...)`, the
central model `(devices, ...)`. The per-device function sees that axis
removed, whichever mapper runs it, so the same function gives the same
results under both.

A run with hosts (the hierarchical algorithm) has a 2-axis mesh, hosts x
devices in a host (`make_mesh(devices, hosts=H)`); the leading axis of the
global arrays then runs over both, host-major, and `device_axes(mesh)` names
the collectives over all devices. Only `shard_map` maps such a mesh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crossbow_jax.engine.config import MAPPERS, ConfigError

DEVICE_AXIS = "devices"
HOST_AXIS = "hosts"

# XLA:CPU ends the process ("Termination timeout ... exceeded") when a thread
# of a collective waits past a timeout. Simulated devices share the host's
# cores, so on a loaded 2-core machine a psum over 8 of them can wait that
# long; these raise the limits for simulated devices.
_SIMULATED_TIMEOUTS = (
    "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
    "--xla_cpu_collective_timeout_seconds=1800",
)


def simulated_devices_flags(count: int, flags: str = "") -> str:
    """`XLA_FLAGS` for `count` simulated CPU devices, added to `flags`.

    Set it before JAX starts, e.g.
    `os.environ["XLA_FLAGS"] = simulated_devices_flags(8, os.environ.get("XLA_FLAGS", ""))`.
    Collective timeouts are raised too (see above); flags already in `flags` win.
    """
    parts = flags.split()
    if not any("xla_force_host_platform_device_count" in p for p in parts):
        parts.append(f"--xla_force_host_platform_device_count={count}")
    for extra in _SIMULATED_TIMEOUTS:
        if not any(p.split("=")[0] == extra.split("=")[0] for p in parts):
            parts.append(extra)
    return " ".join(parts)


def select_devices(num_devices: int | None = None) -> list[jax.Device]:
    """All devices (global across processes) or the first `num_devices` local ones."""
    available = jax.devices() if jax.process_count() > 1 else jax.local_devices()
    if num_devices is None:
        return list(available)
    if num_devices > len(available):
        raise ConfigError(
            f"num_devices={num_devices} but only {len(available)} devices are "
            "available; pass a smaller number or None for all"
        )
    return list(available[:num_devices])


def make_mesh(
    devices: Sequence[jax.Device] | None = None, axis_name: str = DEVICE_AXIS, *, hosts: int = 1
) -> Mesh:
    """A mesh over `devices` (default: all devices): one named axis, or hosts x devices.

    With `hosts` > 1 the devices, in order, are split into `hosts` equal groups
    (in a multi-process run: the processes, whose devices come in process
    order) on a 2-axis mesh (`HOST_AXIS`, `axis_name`). The axes are `Auto`, so
    jitted code may reshard implicitly and results can be indexed like
    ordinary arrays.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one jax device")
    if hosts == 1:
        return Mesh(np.asarray(devices), (axis_name,), axis_types=(AxisType.Auto,))
    if hosts < 1 or len(devices) % hosts:
        raise ConfigError(
            f"hosts={hosts} must divide the {len(devices)} devices into equal groups; "
            "pick a divisor of the device count"
        )
    grid = np.asarray(devices).reshape(hosts, len(devices) // hosts)
    return Mesh(grid, (HOST_AXIS, axis_name), axis_types=(AxisType.Auto,) * 2)


def device_axes(mesh: Mesh) -> str | tuple[str, ...]:
    """The axis name(s) of a collective over all the mesh's devices."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def device_map(
    fn: Callable[..., Any],
    mesh: Mesh,
    mapper: str = "shard_map",
    **pmap_kwargs: Any,
) -> Callable[..., Any]:
    """Maps a per-device function over the mesh's devices.

    Arguments and results of the returned function carry a leading axis of
    size `mesh.size`; `fn` sees one slice of it. Inside `fn` the axes are the
    mesh's names: `device_axes(mesh)` reduces over all devices, for `lax.psum`
    and friends.

    Args:
        fn: the per-device function.
        mesh: a mesh from `make_mesh` (one axis, or hosts x devices for shard_map).
        mapper: "shard_map" (default) or "pmap".
        **pmap_kwargs: extra arguments for `jax.pmap` (e.g. `donate_argnums`).

    Returns:
        The mapped function (under "shard_map", wrap it in `jax.jit`). In a
        loop of your own, place its inputs with `put_on_devices` and wait for
        a result every few steps (docs/usage.md, "Feeding your own loop").
    """
    if mapper not in MAPPERS:
        raise ValueError(f"mapper={mapper!r} is not one of {MAPPERS}")
    axes = device_axes(mesh)
    if mapper == "pmap":
        if len(mesh.axis_names) != 1:
            raise ConfigError(
                f"mesh has axes {mesh.axis_names}; pmap maps one axis: use mapper='shard_map' "
                "for hosts > 1"
            )
        return jax.pmap(fn, axis_name=axes, devices=list(mesh.devices.flat), **pmap_kwargs)

    def per_device(*args):
        out = fn(*jax.tree.map(lambda x: x[0], args))
        return jax.tree.map(lambda x: x[None], out)

    # No varying-manual-axes checks: the learner optimiser is the user's optax code, which
    # need not be written for them (`optax.contrib.reduce_on_plateau`'s `lax.cond` returns a
    # constant in one branch and a per-device value in the other, a type error under the
    # checks); every output here is per device anyway (out_specs over all axes).
    return jax.shard_map(
        per_device, mesh=mesh, in_specs=P(axes), out_specs=P(axes), check_vma=False
    )


def memory_stats(device: jax.Device) -> dict[str, Any]:
    """A device's memory statistics (`bytes_limit`, `bytes_in_use`, ...); {} where its
    backend reports none (CPU) or cannot."""
    try:
        return device.memory_stats() or {}
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return {}


def free_bytes(mesh: Mesh) -> int:
    """Free memory of this process's first device of `mesh`; 0 where it reports none."""
    local = next(d for d in mesh.devices.flat if d.process_index == jax.process_index())
    stats = memory_stats(local)
    return max(0, stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0))


def device_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of arrays with a leading device axis."""
    return NamedSharding(mesh, P(device_axes(mesh)))


def put_on_devices(tree: Any, mesh: Mesh) -> Any:
    """Places host arrays with a leading device axis, one slice per device.

    Feed every batch of a mapped step through this rather than passing NumPy
    arrays straight to the jitted step, and wait for a result every few steps:
    on XLA:CPU with several devices, a loop of steps with a collective that
    never waits can deadlock, and NumPy arguments make it far likelier
    (docs/usage.md, "Feeding your own loop").

    Every process passes the same global array. With one process this is one
    `jax.device_put`; across processes each device receives only its slice
    (`jax.make_array_from_callback`).
    """
    sharding = device_sharding(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(jax.tree.map(np.asarray, tree), sharding)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def first_device(tree: Any) -> Any:
    """The slice held by this process's first device, as NumPy (no device axis)."""

    def read(x):
        shard = min(x.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.asarray(shard.data)[0]

    return jax.tree.map(read, tree)


def replicate(tree: Any, n: int) -> Any:
    """n copies of every leaf along a new leading axis (a view: no host copy)."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)), tree)
