"""Hardware efficiency: m learners at batch b against one learner at batch m*b.

Command (from the repository root; about 8 minutes on a busy 2-core CPU,
`--quick` about half a minute, nearly all of it compiling, with tiny models)::

    python -m experiments.benchmarks.learner_efficiency [--quick] [--out results/benchmarks]

For each model, per-learner batch b in {16, 32} and learners m in {1, 2, 4, 8}
on one device, the engine's compiled training program (forward, backward and
optimiser update; the platform's default dispatch, on CPU 2 unrolled steps;
dispatches called back to back) runs as:

- m learners under SMA with execution "vmap" (the learners' forward/backward
  vmapped over their stacked parameters: grouped convolutions);
- the same with execution "unroll" (one learner after another, unrolled in
  one program);
- the same with execution "im2col" (vmap, with every convolution as patches
  and one batched matmul over the learners);
- the bound: ONE learner at batch m*b (the engine's SSGD layout on one
  device), the most the device does with that many images per step.

Efficiency = images/s of the m learners / images/s of the bound. For each
model (the first only with `--quick`), the largest m at the smallest b is also
handed to the tuner's measured choice (`execution="auto"`,
`crossbow_jax.tuning.executions`, no cache), and its pick is printed and stored. Models:
LeNet (28x28x1) and a ResNet block (ResNet-32's stem and one BasicBlock of its
first stage, 32x32x16 activations, BatchNorm; input 32x32x3). The three
variants of one setting are timed in interleaved rounds; each figure is a
median, compilation timed apart.
"""

from __future__ import annotations

import itertools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from crossbow_jax.models import BasicBlock, LeNet
from experiments.benchmarks import _engine, _timing

VARIANTS = ("vmap", "unroll", "im2col", "bound")


class ResNetBlock(nn.Module):
    """ResNet-32's 3x3 stem and one BasicBlock of its first stage, then the head.

    Attributes:
        num_classes: number of logits.
        width: channels of the stem and the block (16 in ResNet-32).
    """

    num_classes: int = 10
    width: int = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = BasicBlock(self.width)(x, train)
        return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def settings(quick: bool) -> dict[str, Any]:
    """Models (name -> (module, input shape, images per timed call)) and the grid."""
    if quick:
        return {
            "models": {
                "lenet-tiny": (LeNet(conv_features=(4, 8), hidden=16), (28, 28, 1), 64),
                "resnet-block-tiny": (ResNetBlock(width=4), (8, 8, 3), 64),
            },
            "batches": (4,),
            "learners": (2,),
            "repeats": 1,
        }
    return {
        "models": {
            "lenet": (LeNet(), (28, 28, 1), 1024),
            "resnet-block": (ResNetBlock(), (32, 32, 3), 512),
        },
        "batches": (16, 32),
        "learners": (1, 2, 4, 8),
        "repeats": 5,
    }


def stepper(model, data, variant: str, m: int, b: int) -> _engine.Stepper:
    """The engine's compiled dispatch program for one variant."""
    common = {"batch_size": b, "learners_per_device": m, "num_devices": 1}
    if variant == "bound":
        return _engine.Stepper(_engine.engine_run(model, data, algorithm="ssgd", **common))
    return _engine.Stepper(_engine.engine_run(model, data, execution=variant, **common))


def measure(name, model, shape, images, m, b, repeats, variants=VARIANTS) -> list[dict[str, Any]]:
    """Rows for one (model, m, b): each variant's images/s and efficiency ("bound" last)."""
    data = _engine.synthetic(max(2048, 2 * m * b), shape)
    steppers = {v: stepper(model, data, v, m, b) for v in variants}
    calls = max(1, -(-images // (m * b)))
    variants = {
        v: _timing.rate(lambda s=s: s(calls), calls * s.images_per_call)
        for v, s in steppers.items()
    }
    samples = _timing.interleave(variants, repeats)
    bound = _timing.median(samples["bound"])
    rows = []
    for v in variants:
        ips = _timing.median(samples[v])
        rows.append({
            "config": {"model": name, "input": list(shape), "learners": m, "batch": b,
                       "execution": v if v != "bound" else None,
                       "bound_batch": m * b if v == "bound" else None},
            "model": name, "learners": m, "batch": b, "variant": v,
            "images_per_second": ips, "efficiency": ips / bound,
            "spread": _timing.spread(samples[v]), "samples": len(samples[v]),
            "compile_seconds": steppers[v].compile_seconds,
            "flops_per_image": steppers[v].flops / steppers[v].images_per_call,
        })  # fmt: skip
    return rows


def auto_choice(name, model, shape, m, b) -> dict[str, Any]:
    """What `execution="auto"` picks for (model, m, b): every candidate timed by the tuner."""
    data = _engine.synthetic(max(2048, 2 * m * b), shape)
    report = _engine.measured_execution(model, data, batch_size=b, learners_per_device=m)
    return {"config": {"model": name, "input": list(shape), "learners": m, "batch": b},
            "model": name, "learners": m, "batch": b, "variant": "auto",
            "chosen": report["chosen"], "candidates": report["candidates"]}  # fmt: skip


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (model, b, m) with the three variants side by side."""
    lines = {}
    for r in (r for r in rows if r["variant"] != "auto"):
        line = lines.setdefault((r["model"], r["batch"], r["learners"]),
                                {"model": r["model"], "b": r["batch"], "m": r["learners"]})  # fmt: skip
        line[f"{r['variant']} img/s"] = r["images_per_second"]
        if r["variant"] != "bound":
            line[f"eff {r['variant']}"] = r["efficiency"]
    return list(lines.values())


def main(argv=None) -> list[dict[str, Any]]:
    """Runs the grid, prints the table and writes the JSON rows."""
    args = _timing.parse_args(__doc__, argv)
    grid = settings(args.quick)
    repeats = args.repeats or grid["repeats"]
    env = _timing.environment()
    print(f"learner_efficiency: {env['device']}, jax {env['jax']}, {repeats} rounds")
    rows = []
    for (name, (model, shape, images)), b, m in itertools.product(
        grid["models"].items(), grid["batches"], grid["learners"]
    ):
        rows += measure(name, model, shape, images, m, b, repeats)
        print(f"  {name} b={b} m={m}: " + ", ".join(
            f"{r['variant']} {r['images_per_second']:.0f} img/s" for r in rows[-4:]))  # fmt: skip
    for name, (model, shape, _) in list(grid["models"].items())[: 1 if args.quick else None]:
        m, b = max(grid["learners"]), min(grid["batches"])
        rows.append(auto_choice(name, model, shape, m, b))
        print(f"  {name} b={b} m={m}: execution='auto' chose {rows[-1]['chosen']}")
    columns = ["model", "b", "m", "vmap img/s", "unroll img/s", "im2col img/s", "bound img/s",
               "eff vmap", "eff unroll", "eff im2col"]  # fmt: skip
    print(_timing.format_table(summary(rows), columns))
    path = _timing.write_rows(args.out, "learner_efficiency", rows, env, args.quick)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
