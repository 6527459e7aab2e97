"""Several processes (hosts), one run: starting `jax.distributed` from flags or the environment.

A multi-process run is the same `train` call in every process. Each process
sees its own local devices; after `initialize` JAX sees the global devices of
all of them, and the engine maps its one device axis over all of those (use
`mapper="shard_map"`). Every process passes the same data and config; each
device receives only its own slice. Process 0 is the one that reports.

Settings come from the arguments, else from the environment:

| argument | environment variable | meaning |
|---|---|---|
| `coordinator_address` | `CROSSBOW_JAX_COORDINATOR` | `HOST:PORT` of process 0, or `"auto"` |
| `num_processes` | `CROSSBOW_JAX_NUM_PROCESSES` | how many processes take part |
| `process_id` | `CROSSBOW_JAX_PROCESS_ID` | this process's index, 0 .. n-1 |

`"auto"` lets `jax.distributed.initialize()` detect the cluster itself
(Slurm, Open MPI, Cloud TPU, ...). Without a coordinator, or with one
process, nothing is started.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import numpy as np

from crossbow_jax.engine.config import ConfigError

ENV_COORDINATOR = "CROSSBOW_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "CROSSBOW_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CROSSBOW_JAX_PROCESS_ID"
AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Resolved multi-process settings.

    Attributes:
        coordinator_address: `HOST:PORT` of process 0, or "auto" (detected by JAX).
        num_processes: number of processes (None when detected by JAX).
        process_id: this process's index (None when detected by JAX).
    """

    coordinator_address: str
    num_processes: int | None
    process_id: int | None

    @property
    def auto(self) -> bool:
        return self.coordinator_address == AUTO


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"${name}={value!r} must be an integer") from None


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cluster | None:
    """Combines arguments and environment into settings, or None for one process.

    Each argument that is None is taken from its environment variable.

    Raises:
        ConfigError: incomplete or inconsistent settings (e.g. a coordinator
            without `num_processes`, or `process_id` out of range).
    """
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENV_COORDINATOR, "").strip() or None
    n = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
    pid = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
    if address is None:
        if n not in (None, 1) or pid not in (None, 0):
            raise ConfigError(
                f"num_processes={n}, process_id={pid} but no coordinator address; pass "
                f"--coordinator-address HOST:PORT (or set ${ENV_COORDINATOR})"
            )
        return None
    if address == AUTO:
        return Cluster(AUTO, n, pid)
    if ":" not in address:
        raise ConfigError(f"coordinator address {address!r} must be HOST:PORT (or 'auto')")
    if n is None or pid is None:
        raise ConfigError(
            f"coordinator {address} needs num_processes and process_id too "
            f"(--num-processes/--process-id or ${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID})"
        )
    if n < 1 or not 0 <= pid < n:
        raise ConfigError(f"num_processes={n}, process_id={pid}: need n >= 1 and 0 <= id < n")
    if n == 1:
        return None
    return Cluster(address, n, pid)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> bool:
    """Starts `jax.distributed` when several processes take part; else does nothing.

    Call it before anything else touches JAX devices. CPU collectives across
    processes use gloo, set here before initialising.

    Args:
        coordinator_address: `HOST:PORT` of process 0 (the same in every
            process), or "auto" to let JAX detect the cluster. None: from
            `$CROSSBOW_JAX_COORDINATOR`, else a single-process run.
        num_processes: the number of processes (None: `$CROSSBOW_JAX_NUM_PROCESSES`).
        process_id: this process's index (None: `$CROSSBOW_JAX_PROCESS_ID`).
        timeout_s: how long to wait for all processes to join.

    Returns:
        True when this is (now) a multi-process run, False for one process.

    Raises:
        ConfigError: incomplete or inconsistent settings.
    """
    cluster = resolve(coordinator_address, num_processes, process_id)
    if cluster is None:
        return jax.distributed.is_initialized()
    if jax.distributed.is_initialized():
        return True
    if jax.config.jax_cpu_collectives_implementation != "mpi":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cluster.auto:
        kwargs = {"num_processes": cluster.num_processes, "process_id": cluster.process_id}
        jax.distributed.initialize(
            **{k: v for k, v in kwargs.items() if v is not None}, initialization_timeout=timeout_s
        )
    else:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            initialization_timeout=timeout_s,
        )
    return True


def is_main_process() -> bool:
    """True in process 0, the one that prints results and writes result files."""
    return jax.process_index() == 0


def gather(values: list[int]) -> np.ndarray:
    """`values` of every process, (processes, len(values)) (this process's alone when one)."""
    mine = np.asarray(values, np.int64)
    if jax.process_count() == 1:
        return mine[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)


def agree(work, what: str):
    """Runs `work()` in every process and lets none go on unless all succeeded: a process
    whose own part failed raises its error; the others raise one naming that process
    (instead of waiting for it in the next collective)."""
    try:
        out, error = work(), None
    except Exception as e:  # noqa: BLE001 -- raised below, once every process knows
        out, error = None, e
    failed = np.flatnonzero(gather([error is not None])[:, 0])
    if error is not None:
        raise error
    if failed.size:
        raise ConfigError(f"{what} failed in process {failed[0]} (its error says why)")
    return out
