"""A new user's first hour: the Flax tutorials' own loops against `crossbow_jax.train`.

Command (from the repository root; about 15 minutes on a 2-core CPU, `--quick` about 3)::

    python -m experiments.benchmarks.tutorials [--quick] [--out results/benchmarks]

Two published MNIST models, rewritten here with the tutorials' structure (not their code):

- "nnx": the Flax NNX MNIST tutorial (flax `docs_nnx/mnist_tutorial`): Conv(32) ->
  BatchNorm -> relu -> avg pool -> Conv(64) -> BatchNorm -> relu -> avg pool ->
  Linear(256) -> relu -> Dropout -> Linear(10), Dropout given its rngs at call time
  (`__call__(self, x, rngs=None)`); `optax.adamw(0.005, b1=0.9)`, batch 32.
- "linen": the Flax Linen `examples/mnist` CNN: Conv(32) -> relu -> avg pool -> Conv(64)
  -> relu -> avg pool -> Dense(256) -> relu -> Dense(10); `optax.sgd(0.1, momentum=0.9)`,
  batch 128.

For each model, one epoch of real MNIST (60,000 images as float32 / 255, the
tutorials' preprocessing), three variants, each in a fresh process:

1. "tutorial": the tutorial's loop as the tutorial writes it: a jit'd step on
   shuffled batches, the test set evaluated at the end.
2. "first run": `crossbow_jax.train(model, train, test, optimizer=<the tutorial's>,
   target_accuracy=<the tutorial's final accuracy>, epochs=1)` with every other
   setting at its default, and cold caches (an empty `CROSSBOW_JAX_CACHE`: no
   execution decision, no compiled programs).
3. "second run": the same call again in a new process with the caches the first
   run left.

Each variant's figure is the wall time of the whole call (model built, compiled,
trained, evaluated), so a crossbow_jax run that reaches the tutorial's accuracy
early stops there. Ratios are against the tutorial's wall time in the same run of
this script. Goals (issue 21): first run within 1.3x, second run at or below 1.0x.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from experiments.benchmarks import _timing

OPTIMISERS = {"nnx": ("adamw", 0.005, 32), "linen": ("sgd", 0.1, 128)}


def _optimizer(name: str):
    import optax

    kind, lr, _ = OPTIMISERS[name]
    return optax.adamw(lr, b1=0.9) if kind == "adamw" else optax.sgd(lr, momentum=0.9)


def _nnx_cnn():
    from flax import nnx

    class TutorialCNN(nnx.Module):
        """The NNX tutorial's CNN structure (see the module docstring)."""

        def __init__(self, *, rngs: nnx.Rngs):
            self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
            self.norm1 = nnx.BatchNorm(32, rngs=rngs)
            self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
            self.norm2 = nnx.BatchNorm(64, rngs=rngs)
            self.pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
            self.linear1 = nnx.Linear(3136, 256, rngs=rngs)
            self.dropout = nnx.Dropout(rate=0.025)
            self.linear2 = nnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x, rngs: nnx.Rngs | None = None):
            x = self.pool(nnx.relu(self.norm1(self.conv1(x))))
            x = self.pool(nnx.relu(self.norm2(self.conv2(x))))
            x = x.reshape(x.shape[0], -1)
            x = self.dropout(nnx.relu(self.linear1(x)), rngs=rngs)
            return self.linear2(x)

    return TutorialCNN(rngs=nnx.Rngs(0))


def _linen_cnn():
    import flax.linen as nn

    class ExampleCNN(nn.Module):
        """The Linen examples/mnist CNN structure (see the module docstring)."""

        @nn.compact
        def __call__(self, x):
            x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
            x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
            x = x.reshape((x.shape[0], -1))
            return nn.Dense(10)(nn.relu(nn.Dense(256)(x)))

    return ExampleCNN()


def _data(quick: bool):
    import crossbow_jax

    d = crossbow_jax.data.load_dataset("mnist")
    n, t = (6000, 1000) if quick else (len(d.train_labels), len(d.test_labels))
    scale = lambda x: x.astype(np.float32) / 255  # the tutorials' preprocessing
    return (scale(d.train_images[:n]), d.train_labels[:n]), (
        scale(d.test_images[:t]),
        d.test_labels[:t],
    )


def _tutorial_nnx(train, test) -> float:
    """The NNX tutorial's loop (one epoch, then the test set); returns the test accuracy."""
    import jax
    import optax
    from flax import nnx

    model = _nnx_cnn()
    optimizer = nnx.Optimizer(model, _optimizer("nnx"), wrt=nnx.Param)
    rngs = nnx.Rngs(dropout=1)

    @nnx.jit
    def train_step(model, optimizer, rngs, x, y):
        def loss_fn(model, rngs):
            logits = model(x, rngs=rngs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model, rngs)
        optimizer.update(model, grads)
        return loss

    @nnx.jit
    def correct(model, x, y):
        return (model(x).argmax(-1) == y).sum()

    model.train()
    for idx in _batches(len(train[1]), OPTIMISERS["nnx"][2]):
        train_step(model, optimizer, rngs, train[0][idx], train[1][idx])
    model.eval()
    return _accuracy(lambda x, y: correct(model, x, y), test, jax)


def _tutorial_linen(train, test) -> float:
    """The Linen example's loop (one epoch, then the test set); returns the test accuracy."""
    import jax
    import optax

    model, tx = _linen_cnn(), _optimizer("linen")
    params = model.init(jax.random.PRNGKey(0), train[0][:1])["params"]
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        def loss_fn(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def correct(params, x, y):
        return (model.apply({"params": params}, x).argmax(-1) == y).sum()

    for idx in _batches(len(train[1]), OPTIMISERS["linen"][2]):
        params, opt_state = train_step(params, opt_state, train[0][idx], train[1][idx])
    return _accuracy(lambda x, y: correct(params, x, y), test, jax)


def _batches(n: int, batch: int):
    """One epoch of shuffled batches, the last incomplete one dropped (as both tutorials do)."""
    order = np.random.default_rng(0).permutation(n)
    return order[: n // batch * batch].reshape(-1, batch)


def _accuracy(correct, test, jax) -> float:
    x, y = test
    hits = sum(int(jax.device_get(correct(x[i : i + 1000], y[i : i + 1000])))
               for i in range(0, len(y), 1000))  # fmt: skip
    return hits / len(y)


def _crossbow(name: str, train, test, target: float | None) -> dict[str, Any]:
    import crossbow_jax

    model = _nnx_cnn() if name == "nnx" else _linen_cnn()
    result = crossbow_jax.train(model, train, test, optimizer=_optimizer(name), epochs=1,
                                target_accuracy=target, progress=False)  # fmt: skip
    choice = result.executions or {}
    return {"accuracy": result.accuracy, "steps": result.steps,
            "execution": choice.get("chosen", result.config.execution),
            "compile_seconds": result.compile_time, "programs": result.programs,
            "setup_seconds": result.setup_time, "choice_seconds": choice.get("seconds"),
            "choice_cached": choice.get("cached"), "skipped": choice.get("skipped"),
            "time_to_accuracy": result.time_to_accuracy}  # fmt: skip


def _variant(name: str, variant: str, quick: bool, target: float | None) -> dict[str, Any]:
    """One variant in this process: its wall time from the model's construction to the end."""
    train, test = _data(quick)
    start = time.perf_counter()
    if variant == "tutorial":
        run = _tutorial_nnx if name == "nnx" else _tutorial_linen
        row = {"accuracy": run(train, test)}
    else:
        row = _crossbow(name, train, test, target)
    row["wall_seconds"] = time.perf_counter() - start
    return row


def _in_process(name: str, variant: str, quick: bool, target, cache: str) -> dict[str, Any]:
    """`_variant` in a fresh Python process with `cache` as its crossbow_jax cache folder."""
    env = dict(os.environ, CROSSBOW_JAX_CACHE=cache)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the run's own cache decides
    args = [sys.executable, "-m", "experiments.benchmarks.tutorials", "--child",
            json.dumps([name, variant, quick, target])]  # fmt: skip
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{name}/{variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][4:])


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        name, variant, quick, target = json.loads(sys.argv[2])
        print("ROW " + json.dumps(_variant(name, variant, quick, target), default=str))
        return
    args = _timing.parse_args(__doc__, argv)
    rows = []
    for name in ("nnx", "linen"):
        with tempfile.TemporaryDirectory(prefix="crossbow_jax-cache-") as cache:
            tutorial = _in_process(name, "tutorial", args.quick, None, cache)
            target = tutorial["accuracy"]
            first = _in_process(name, "first run", args.quick, target, cache)
            second = _in_process(name, "second run", args.quick, target, cache)
        for variant, row in (("tutorial", tutorial), ("first run", first), ("second run", second)):
            row.update(model=name, variant=variant,
                       ratio=row["wall_seconds"] / tutorial["wall_seconds"])  # fmt: skip
            rows.append(row)
            print(f"{name:>5} {variant:>10}: accuracy {row['accuracy']:.4f}  wall "
                  f"{row['wall_seconds']:7.1f} s  ({row['ratio']:.2f}x the tutorial)"
                  + (f"  steps {row['steps']}, compile {row['compile_seconds']:.1f} s, "
                     f"execution {row['execution']}" if "steps" in row else ""), flush=True)  # fmt: skip
    print(
        f"written: {_timing.write_rows(args.out, 'tutorials', rows, _timing.environment(), args.quick)}"
    )


if __name__ == "__main__":
    main()
