"""Small learnable problems and models for the engine tests."""

import os

import flax.linen as nn
import numpy as np

from crossbow_jax.engine.mapping import simulated_devices_flags

# XLA:CPU without its LLVM optimisation passes and with its older fusion emitters: small
# programs compile in about a third of the default time (tests/conftest.py).
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)


def subprocess_xla_flags(devices: int) -> str:
    """`XLA_FLAGS` for a process a test starts: `devices` simulated devices and the suite's
    other flags (its compile options: a run compared with one in the suite's own process
    must compile the same way)."""
    keep = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return simulated_devices_flags(devices, " ".join(keep))


class MLP(nn.Module):
    classes: int = 4

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.classes)(nn.relu(nn.Dense(32)(x)))


def mnist_mlp():
    """The MLP for 10 classes (`--model _engine_fixtures:mnist_mlp` in the shell tests)."""
    return MLP(classes=10)


class BNNet(nn.Module):
    """Dense + BatchNorm + dropout: exercises batch_stats and the dropout rng."""

    classes: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(32)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.Dropout(0.1, deterministic=not train)(nn.relu(x))
        return nn.Dense(self.classes)(x)


def blobs(n=1024, classes=4, dim=8, seed=0, scale=3.0):
    """Gaussian blobs: class c is centred on a random point; learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * scale
    y = rng.integers(0, classes, size=n).astype(np.int32)
    x = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    return x, y


def split(n_train=768, n_test=256, **kw):
    x, y = blobs(n_train + n_test, **kw)
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def tiny_images(n=256, seed=0):
    """uint8 8x8x3 images whose class is the brightest channel."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n).astype(np.int32)
    x = rng.integers(0, 120, size=(n, 8, 8, 3))
    x[np.arange(n), :, :, y] += 120
    return x.astype(np.uint8), y


def prepared(config, model, train, test=None, optimizer=None):
    """The engine prepared for `config`'s layout (as `fit` starts), and the resolved data."""
    from crossbow_jax.engine.inputs import resolve
    from crossbow_jax.engine.programs import prepare

    model, data, mesh = resolve(config, model, train, test)
    return prepare(config, model, optimizer, data, mesh, config.learners_per_device), data


def he_variables(shapes, seed=0, residual_scale=1.0):
    """Variables of the given shapes built in numpy (compiling the initialisers takes
    seconds): He-scaled random kernels, other parameters zero, BatchNorm scales and
    variances one, except the last BatchNorm scale of each bottleneck block:
    `residual_scale` (as in zero-init residual training)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = jax.tree_util.keystr(path)
        if "kernel" in key:
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)
        if "Bottleneck" in key and "BatchNorm_2']['scale" in key:
            return jnp.full(leaf.shape, residual_scale, leaf.dtype)
        return jnp.full(leaf.shape, 1.0 if "scale" in key or "var" in key else 0.0, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)
