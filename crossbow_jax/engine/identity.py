"""What a resumed run must share beyond its config: the data and the optimiser's behaviour.

`data_fingerprint` names each part of the data by dtype, shape and a content
hash; `describe_data_difference` says in one phrase what differs between two.
`optimizer_behaviour` summarises an optax optimiser's first updates on fixed
pseudo-random parameters and gradients; `describe_behaviour_difference` (and
`same_behaviour`) compare two such summaries within a tolerance, so that a run
resumed on other hardware, whose float32 results differ in the last bits,
still matches. The fingerprints are JSON-able, for a run's config.json.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any

import jax
import numpy as np
import optax

from crossbow_jax.engine import runfolder
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.inputs import Arrays

FULL_HASH_BYTES = 256 << 20
"""Arrays up to this size are hashed whole (sha256: 1 to 2 GB/s); larger ones by rows."""
SAMPLE_BYTES = 32 << 20
"""About how many bytes of rows the sample of a larger array holds."""
PARTS = ("train inputs", "train labels", "test inputs", "test labels")
SEED = 20
"""Of the optimiser fingerprint's parameters, gradients and probe direction."""
STEPS = 3
"""Updates the optimiser fingerprint takes: enough for momentum to show."""
MAX_LEAF_SIZE = 1 << 14
"""Elements a leaf of the optimiser fingerprint's tree holds at most."""
PROBES = ("size", "along the gradient", "along the parameters", "along ones", "along a probe")
"""The numbers kept of each update of each leaf: its norm, then its projections on
these unit vectors."""
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
"""XLA:CPU options for the optimiser fingerprint, whose compile is most of its cost."""


def array_fingerprint(a: np.ndarray, full_hash_bytes: int = FULL_HASH_BYTES) -> str:
    """`a` as "dtype[shape] sha256:<16 hex digits>".

    An array over `full_hash_bytes` is hashed by about `SAMPLE_BYTES` of its
    rows, evenly spaced from the first to the last ("... sha256 of 10699
    rows:..."): a change to a row it leaves out goes unseen, but it takes
    under 0.1 s, and a memory-mapped array is read at those rows only.
    """
    a = np.asarray(a)
    what = f"{a.dtype}{list(a.shape)}"
    if a.nbytes > full_hash_bytes and a.ndim >= 1 and len(a) > 2:
        count = min(len(a), max(2, SAMPLE_BYTES // max(1, a.nbytes // len(a))))
        rows = np.unique(np.linspace(0, len(a) - 1, count).round().astype(np.int64))
        digest = hashlib.sha256(memoryview(np.ascontiguousarray(a[rows])).cast("B"))
        return f"{what} sha256 of {len(rows)} rows:{digest.hexdigest()[:16]}"
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B"))
    return f"{what} sha256:{digest.hexdigest()[:16]}"


def data_fingerprint(data: Arrays, full_hash_bytes: int = FULL_HASH_BYTES) -> dict[str, str]:
    """The data set's name ("data set") and each of `PARTS` ("none" where there is none).

    Held arrays get `array_fingerprint`, as `Arrays` holds them (after any
    reshaping the engine did). A streamed data set (ImageNet) gets its size
    and an example's dtype and shape, with no content hash: other files of the
    same size and shape under the same name go unseen.
    """
    if data.train_x is not None:
        arrays = (data.train_x, data.train_y, data.test_x, data.test_y)
        parts = ["none" if a is None else array_fingerprint(a, full_hash_bytes) for a in arrays]
    else:
        streamed = f"streamed from {data.name!r}, " + (
            "not hashed" if data.train_sample is None else "sample " + array_fingerprint(
                np.ascontiguousarray(data.train_sample[0]), full_hash_bytes).split()[-1])  # fmt: skip
        parts = [
            f"{e.dtype}{[data.num_train, *e.shape[1:]]} {streamed}"
            for e in (np.asarray(data.example), np.asarray(data.label_example))
        ]
        parts += [streamed if data.test_stream is not None else "none"] * 2
    return {"data set": data.name, **dict(zip(PARTS, parts))}


def describe_data_difference(saved: dict[str, str], now: dict[str, str]) -> str:
    """What differs between two data fingerprints, in one phrase ("" if nothing)."""
    changed = [k for k in {**saved, **now} if saved.get(k, "none") != now.get(k, "none")]
    if not changed:
        return ""
    k, verb = changed[0], "were" if changed[0].endswith("s") else "was"
    return f"{k} {verb} {saved.get(k, 'none')}, now {now.get(k, 'none')}{runfolder.more(changed)}"


def _shrunk(shape: tuple[int, ...], max_size: int) -> tuple[int, ...]:
    """`shape` with its largest axis halved until it holds at most `max_size` elements."""
    shape = list(shape)
    while math.prod(shape) > max_size:
        i = shape.index(max(shape))
        shape[i] = (shape[i] + 1) // 2
    return tuple(shape)


def optimizer_behaviour(
    optimizer: optax.GradientTransformation,
    params_like: Any,
    device: jax.Device | None = None,
    max_leaf_size: int = MAX_LEAF_SIZE,
) -> dict[str, list[float]] | None:
    """A behavioural fingerprint of `optimizer`: its first `STEPS` updates, summarised.

    The optimiser starts on a tree shaped like `params_like` (arrays or
    `jax.ShapeDtypeStruct`s: one learner's parameters) of fixed pseudo-random
    float32 values in [-1, 1), and takes `STEPS` fixed pseudo-random gradients,
    jitted on `device` (default: the CPU). A leaf over `max_leaf_size` elements
    is shrunk (its largest axis halved until it fits; the rank stays), which
    bounds the cost for any model. Each update of each leaf is kept as its norm
    and its projections on `PROBES`, computed in float64 on the host. Only these
    first updates are seen: a schedule that differs later on does not show.

    Returns:
        {leaf path: `STEPS * len(PROBES)` numbers}, or None where the optimiser
        cannot run on gradients alone: its update takes extra arguments
        (`optax.contrib.reduce_on_plateau`'s `value`: TypeError; `sophia`'s
        `obj_fn`: ValueError) or reduces over a named axis (NameError).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params_like)
    shapes = [_shrunk(tuple(np.shape(x)), max_leaf_size) for _, x in flat]
    rng = np.random.RandomState(SEED)  # a stream NumPy keeps the same across versions

    def draw():
        return [rng.uniform(-1.0, 1.0, s).astype(np.float32) for s in shapes]

    params, probe, grads = draw(), draw(), [draw() for _ in range(STEPS)]

    def run(params, grads):  # each leaf of grads: (STEPS, ...)
        def step(carry, g):
            params, state = carry
            u, state = optimizer.update(g, state, params)
            return (optax.apply_updates(params, u), state), u

        return jax.lax.scan(step, (params, optimizer.init(params)), grads)[1]

    if device is None:
        try:
            device = jax.devices("cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS leaves the CPU out
            device = jax.devices()[0]
    stacked = jax.tree_util.tree_unflatten(treedef, map(np.stack, zip(*grads)))
    inputs = jax.device_put((jax.tree_util.tree_unflatten(treedef, params), stacked), device)
    try:
        lowered = jax.jit(run).lower(*inputs)
    except (TypeError, ValueError, NameError):
        return None
    try:
        compiled = lowered.compile(FAST_COMPILE if device.platform == "cpu" else None)
    except jax.errors.JaxRuntimeError:  # "No such compile option" in another XLA
        compiled = lowered.compile()
    updates = treedef.flatten_up_to(jax.device_get(compiled(*inputs)))
    out = {}
    for i, (path, _) in enumerate(flat):
        numbers = []
        for t in range(STEPS):
            u = np.asarray(updates[i][t], np.float64).ravel()
            numbers.append(np.sqrt(np.sum(u * u)))
            for d in (grads[t][i], params[i], np.ones(u.size), probe[i]):
                d = np.asarray(d, np.float64).ravel()
                numbers.append(np.sum(u * d) / max(np.sqrt(np.sum(d * d)), 1e-30))
        out[jax.tree_util.keystr(path)] = [float(f"{x:.8g}") for x in numbers]
    return out


def describe_behaviour_difference(
    saved: dict[str, list[float]] | None,
    now: dict[str, list[float]] | None,
    rtol: float = 1e-4,
) -> str | None:
    """How two `optimizer_behaviour`s differ, in one phrase; None if they match.

    The numbers of an update of a leaf match when each is within `rtol` times
    the larger of the two updates' norms, as float32 results of other hardware
    do. Two optimisers that could not be fingerprinted (None) match.
    """
    if saved is None or now is None:
        if saved is None and now is None:
            return None
        before, after = ("could", "cannot") if now is None else ("could not", "can")
        return f"it {before} run on gradients alone, and now {after}"
    if {k: len(v) for k, v in saved.items()} != {k: len(v) for k, v in now.items()}:
        return "it was fingerprinted on other parameters"
    n = len(PROBES)
    for t, nth in zip(range(STEPS), ("first", "second", "third")):
        block = slice(t * n, (t + 1) * n)
        size, size_now = (math.hypot(*(v[t * n] for v in f.values())) for f in (saved, now))
        for leaf in saved:
            a, b = np.asarray(saved[leaf][block]), np.asarray(now[leaf][block])
            tol = rtol * max(abs(a[0]), abs(b[0])) + 1e-30
            if np.any((np.abs(a - b) > tol) | (np.isnan(a) != np.isnan(b))):
                was, now_ = f"{size:.4g}", f"{size_now:.4g}"
                if was != now_:
                    return f"its updates differ ({nth} update's size was {was}, now {now_})"
                return f"its updates differ ({nth} update of {leaf} points elsewhere, size {was})"
    return None


def same_behaviour(
    saved: dict[str, list[float]] | None, now: dict[str, list[float]] | None, rtol: float = 1e-4
) -> bool:
    """Whether two `optimizer_behaviour`s match (`describe_behaviour_difference`)."""
    return describe_behaviour_difference(saved, now, rtol) is None


# --- the run folder's fingerprints, compared ---------------------------------------------

FINGERPRINTS = {
    "layout": "the layout (devices x learners per device)",
    "model": "the model",
    "optimizer": "the optimiser",
}
"""Fingerprinted parts of the state: `config.json` key `fingerprint_<part>`, and their names
(`fingerprint_data` and `fingerprint_behaviour` hold the ones below)."""
DEFAULT = "default"
"""`fingerprint_behaviour` of the engine's own optimiser, which the settings pin."""


def data_difference(saved: dict[str, str], now: dict[str, str]) -> str:
    """Why a resume on data fingerprinted `now` is refused ("" when it is the run's)."""
    what = describe_data_difference(saved, now)
    return f"the data differs from the run's ({what})" if what else ""


def behaviour_difference(saved, now) -> str | None:
    """Why a resume with an optimiser of behaviour `now` is refused (None: it is the run's)."""
    if saved == now:
        return None
    if DEFAULT in (saved, now):
        was, is_ = ("the engine's (from the settings)", "one passed as optimizer=")[
            :: 1 if saved == DEFAULT else -1
        ]
        return f"the run's optimiser was {was}, now {is_}"
    what = describe_behaviour_difference(saved, now)
    return f"the optimiser behaves differently from the run's: {what}" if what else None


def fingerprint(tree: Any) -> dict[str, str]:
    """Every leaf of `tree` by path: "dtype[shape]" for an array, the value for a number."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path): f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") else repr(x)
        for path, x in leaves
    }


def describe_difference(saved: dict[str, str], now: dict[str, str]) -> str:
    """What differs between two fingerprints, in a few words."""
    changed = [k for k in saved if k in now and saved[k] != now[k]]
    gone = [k for k in saved if k not in now]
    new = [k for k in now if k not in saved]
    parts = []
    if changed:
        first = changed[0]
        parts.append(f"{first} was {saved[first]}, now {now[first]}{runfolder.more(changed)}")
    for what, keys in (("saved arrays missing now", gone), ("arrays not in the run", new)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
    return "; ".join(parts)


def saved_settings(saved: dict[str, Any]) -> dict[str, Any]:
    """The settings in a run folder's `config.json` (its fingerprints and bookkeeping left
    out), with any setting it lacks at its default: a folder written before that setting
    existed ran as its default runs."""
    settings = {k: v for k, v in saved.items()
                if not k.startswith("fingerprint_") and k != runfolder.DIGESTS_KEPT}  # fmt: skip
    return {**TrainConfig().identity(), **settings}


def check_same_model(directory: str, params: Any) -> None:
    """Refuses a model whose parameter tree (one learner's) is not the run folder's."""
    path = os.path.join(directory, runfolder.CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f).get("fingerprint_model")
    now = fingerprint(params)
    if saved is not None and saved != now:
        raise ConfigError(
            f"the model differs from the one {directory!r} was trained with "
            f"({describe_difference(saved, now)}); pass the run's model"
        )
