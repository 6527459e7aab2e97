"""Every model of the paper trains a few steps under SMA, several learners on several devices."""

import jax
import numpy as np
import pytest

import crossbow_jax
from crossbow_jax import models


@pytest.mark.parametrize(
    "name, shape, classes",
    [
        ("lenet", (28, 28, 1), 10),
        ("resnet32", (32, 32, 3), 10),
        ("vgg16", (32, 32, 3), 100),
        ("resnet50", (32, 32, 3), 10),  # ImageNet ResNet-50 at a small input, to stay cheap
    ],
)
def test_model_trains_under_sma_on_several_devices(name, shape, classes):
    rng = np.random.default_rng(0)
    n = 2 * 2 * 2 * 2  # devices x learners x batch x steps
    x = rng.integers(0, 256, size=(n + 4,) + shape, dtype=np.uint8)
    y = (np.arange(n + 4) % classes).astype(np.int32)
    rows = []
    evaluated = name != "resnet50"  # its evaluation program would add a third to the compile
    result = crossbow_jax.train(
        models.get_model(name, num_classes=classes),
        (x[:n], y[:n]),
        (x[n:], y[n:]) if evaluated else None,
        batch_size=2,
        learners_per_device=2,
        num_devices=2,
        epochs=1,
        execution="vmap",
        steps_per_dispatch=1,
        progress=False,
        callback=rows.append,
        learning_rate=0.01,
        divergence_factor=0,  # random pixels, batch 2 with BatchNorm: mechanics, not learning
    )
    assert result.steps == 2 and result.devices == 2 and result.learners_per_device == 2
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (result.accuracy is not None) == evaluated
    shapes = models.variable_shapes(name, num_classes=classes, input_shape=shape)["params"]
    got = result.params["params"]
    assert jax.tree.map(lambda a: a.shape, got) == jax.tree.map(lambda a: a.shape, shapes)
