"""Flat SMA against SMA inside / DiLoCo across hosts, on 2 processes x 2 devices.

Two local processes joined by `jax.distributed` (gloo collectives over
127.0.0.1), each with 2 simulated CPU devices, are the two "hosts". The same
k = 16 learners (4 per device, b = 16) train LeNet on the real MNIST for one
epoch, learner settings as in the other LeNet sweeps (lr 0.01, momentum 0.9,
weight decay 1e-4, alpha 0.1, central momentum 0.9):

    flat          algorithm="sma": one all-reduce over all 4 devices, across
                  the processes, at every step
    hierarchical  algorithm="hierarchical", sync_every=8: SMA over each
                  process's devices at every step, DiLoCo (Nesterov 0.7, 0.9)
                  across the processes every 8 steps

Figures: test accuracy of the central model after the epoch, images/s, the
bytes all-reduced per step by mesh axis, and the share of step time spent in
the cross-process all-reduce: after training, each run times (median of 20)
an all-reduce of the model's size across the processes as its step does it
(flat: over all 4 devices; hierarchical: over the hosts axis), and divides it,
weighed by how often the step does it (every step; every 8th), by the run's
measured step time. Both processes share this machine's 2 cores, so the
all-reduce is a loopback one: the share says what a period saves, not what a
network would cost.

    python -m experiments.hierarchical            # about 4 minutes on 2 CPU cores
    python -m experiments.hierarchical --quick    # synthetic data, about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = {
    "flat": {"algorithm": "sma"},
    "hierarchical": {"algorithm": "hierarchical", "sync_every": 8},
}
SETTINGS = {
    "batch_size": 16, "learners_per_device": 4, "learning_rate": 0.01, "momentum": 0.9,
    "weight_decay": 1e-4, "alpha": 0.1, "central_momentum": 0.9, "epochs": 1,
    "execution": "unroll", "progress": False,
}  # fmt: skip
QUICK = {"train_examples": 512, "test_examples": 128, "batch_size": 8, "learners_per_device": 2}
TIMEOUT_S = 3600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _median_seconds(fn, x, repeats: int = 20) -> float:
    import jax

    jax.block_until_ready(fn(x))  # compiled and warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def worker(variant: str, quick: bool, out: str) -> None:
    """One process of one run: join the cluster, train, time the all-reduce, report."""
    from crossbow_jax.engine import distributed

    distributed.initialize()
    import jax
    import numpy as np
    from jax import lax

    import crossbow_jax
    from crossbow_jax.data import training_data
    from crossbow_jax.engine import device_map, make_mesh, put_on_devices

    options = {**SETTINGS, **VARIANTS[variant], "mapper": "shard_map"}
    if quick:
        options.update({k: v for k, v in QUICK.items() if k in SETTINGS})
        data = training_data("synthetic", like="mnist", train_examples=QUICK["train_examples"],
                             test_examples=QUICK["test_examples"])  # fmt: skip
    else:
        data = training_data("mnist")
    result = crossbow_jax.train("lenet", **data, **options)

    size = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(result.params["params"]))
    hosts = jax.process_count()
    if variant == "flat":  # the engine's own mesh: one axis over every device
        mesh, axes, every = make_mesh(jax.devices()), "devices", 1
    else:
        mesh, axes, every = make_mesh(jax.devices(), hosts=hosts), "hosts", 8
    allreduce = jax.jit(device_map(lambda v: lax.psum(v, axes), mesh))
    x = put_on_devices(np.ones((mesh.size, size), np.float32), mesh)
    seconds = _median_seconds(allreduce, x)
    per_step = result.devices * result.learners_per_device * options["batch_size"]
    step_seconds = per_step / result.images_per_second
    row = {
        "variant": variant,
        "processes": hosts,
        "devices": result.devices,
        "learners": result.devices * result.learners_per_device,
        "accuracy": result.accuracy,
        "steps": result.steps,
        "images_per_second": result.images_per_second,
        "step_seconds": step_seconds,
        "all_reduce_bytes": result.all_reduce_bytes,
        "cross_process_all_reduce_seconds": seconds,
        "cross_process_every": every,
        "cross_process_share": seconds / every / step_seconds,
        "compile_time": result.compile_time,
    }
    if distributed.is_main_process():
        Path(out, f"{variant}.json").write_text(json.dumps(row, indent=1))


def _launch(variant: str, quick: bool, out: Path) -> dict:
    from crossbow_jax.engine.mapping import simulated_devices_flags

    port = _free_port()
    procs = []
    for i in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROSSBOW_JAX_")}
        env.update(XLA_FLAGS=simulated_devices_flags(2), JAX_PLATFORMS="cpu",
                   CROSSBOW_JAX_COORDINATOR=f"127.0.0.1:{port}", CROSSBOW_JAX_NUM_PROCESSES="2",
                   CROSSBOW_JAX_PROCESS_ID=str(i))  # fmt: skip
        cmd = [sys.executable, "-m", "experiments.hierarchical", "--worker", variant,
               "--out", str(out)] + (["--quick"] if quick else [])  # fmt: skip
        log = open(out / f"{variant}-process-{i}.log", "w")  # noqa: SIM115 -- closed below
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p, _ in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p, _ in procs):
            break
        time.sleep(0.5)
    for p, log in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        log.close()
    if any(p.returncode for p, _ in procs):
        raise SystemExit(f"{variant}: a process failed; see {out}/{variant}-process-*.log")
    return json.loads((out / f"{variant}.json").read_text())


def table(rows: list[dict]) -> str:
    lines = [
        (
            "| variant | learners | accuracy after 1 epoch | images/s | step (ms) | "
            "all-reduced per step | cross-process all-reduce (ms) | every | share of step time |"
        ),
        "|---" * 9 + "|",
    ]
    for r in rows:
        split = ", ".join(f"{v / 1024:,.1f} KiB {k}" if v >= 1024 else f"{v:.0f} B {k}"
                          for k, v in sorted(r["all_reduce_bytes"].items()))  # fmt: skip
        lines.append(
            f"| {r['variant']} | {r['learners']} | {r['accuracy']:.4f} | "
            f"{r['images_per_second']:,.0f} | {r['step_seconds'] * 1e3:.1f} | {split} | "
            f"{r['cross_process_all_reduce_seconds'] * 1e3:.2f} | {r['cross_process_every']} | "
            f"{r['cross_process_share']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="synthetic data: a smoke run")
    parser.add_argument("--out", default=None, help="folder (default: experiments/results)")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out or (RESULTS / "quick" if args.quick else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        worker(args.worker, args.quick, str(out))
        return 0
    work = out / "hierarchical-processes"  # each process's log and row; kept if one fails
    work.mkdir(exist_ok=True)
    rows = [_launch(variant, args.quick, work) for variant in VARIANTS]
    shutil.rmtree(work)
    (out / "hierarchical.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = "# hierarchical\n\n" + ("[synthetic data: a smoke run]\n\n" if args.quick else "")
    (out / "hierarchical.md").write_text(text + table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
