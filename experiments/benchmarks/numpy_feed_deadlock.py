"""How often a mapped step loop hangs on XLA:CPU, by how its batches are fed.

Command (from the repository root; about 5 minutes on a 2-core CPU)::

    python -m experiments.benchmarks.numpy_feed_deadlock [--runs 10] [--devices 8]

Each run is a fresh process with `--devices` simulated CPU devices. It calls a
jitted `shard_map` step, whose body has a `psum`, 300 times, feeding it a
(devices, 4, 16, 8) float32 batch either as a NumPy array passed straight to
the step (`numpy`) or placed by `crossbow_jax.engine.put_on_devices` before
each step; and either never waiting for a result until the end, or calling
`block_until_ready` every 16 steps, which bounds how many steps are in flight.

A run that has not finished after `--timeout` seconds (a healthy one takes
about 3 s, start-up included) counts as hung and is killed. The collective
timeouts are the test suite's (`simulated_devices_flags`), so a deadlock shows
up as a hang rather than as an abort. This is a JAX/XLA:CPU runtime fault,
not a crossbow_jax one; the script is here to recheck it on new jaxlib
versions (docs/usage.md, "Feeding your own loop").
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap

import jax

CHILD = textwrap.dedent(
    """
    import os, sys
    from crossbow_jax.engine.mapping import simulated_devices_flags
    os.environ["XLA_FLAGS"] = simulated_devices_flags(int(sys.argv[2]))
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from crossbow_jax.engine import make_mesh, put_on_devices

    feed, wait, mesh = sys.argv[1], int(sys.argv[3]), make_mesh()
    body = lambda x, y: x + jax.lax.psum(y.sum(), "devices") * 1e-3
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("devices"), out_specs=P("devices")))
    x = put_on_devices(np.zeros((mesh.size, 16), np.float32), mesh)
    host = np.ones((mesh.size, 4, 16, 8), np.float32)
    for i in range(300):
        x = step(x, put_on_devices(host, mesh) if feed == "put_on_devices" else host)
        if wait and i % wait == 0:
            x.block_until_ready()
    print(float(x.sum()))
    """
)
MODES = [(f, w) for f in ("numpy", "put_on_devices") for w in (0, 16)]


def run_once(mode: tuple[str, int], devices: int, timeout: float) -> str:
    """'ok', 'hung' or 'failed' for one fresh process."""
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, mode[0], str(devices), str(mode[1])],
            env=env,
            capture_output=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return "hung"
    return "ok" if done.returncode == 0 else "failed"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="fresh processes per feeding mode")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a run is hung")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.devices < 2:
        parser.error(f"--runs {args.runs} / --devices {args.devices}: need runs >= 1, devices >= 2")
    print(f"jax {jax.__version__}, {args.devices} simulated CPU devices, {args.runs} runs per mode")
    print("| feeding | waits | ok | hung | failed |\n|---|---|---|---|---|")
    for mode in MODES:
        outcomes = [run_once(mode, args.devices, args.timeout) for _ in range(args.runs)]
        counts = [outcomes.count(o) for o in ("ok", "hung", "failed")]
        waits = f"every {mode[1]} steps" if mode[1] else "never"
        print(f"| {mode[0]} | {waits} | " + " | ".join(map(str, counts)) + " |", flush=True)


if __name__ == "__main__":
    main()
