"""What a run learns and reports: the loss, accuracy for classification, the user's metrics.

`Task.figures(outputs, labels)` gives one value per example for every
figure: `loss` (the user's `loss_fn`, default softmax cross-entropy on
integer labels), `accuracy` when the task is classification (outputs end
in one score per class, labels are class indices), and each metric of the
user's `metrics_fn`. Figures of examples with several positions (token
sequences) are their mean over the positions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

LossFn = Callable[[Any, Any], Any]  # (outputs, labels) -> per-example loss
MetricsFn = Callable[[Any, Any], dict[str, Any]]  # -> {name: per-example values}
RESERVED = ("loss", "accuracy", "count", "step", "epoch", "time", "images_per_second",
            "reached_target", "learners_per_device", "learning_rate",
            "all_reduce_bytes", "peak_bytes")  # fmt: skip
"""Names of the engine's own figures and history fields, which a user metric may not take."""


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """The loss and figures of a run.

    Attributes:
        loss_fn: `(outputs, labels) -> per-example loss`; None: softmax
            cross-entropy on integer class labels.
        metrics_fn: `(outputs, labels) -> {name: per-example values}`, or None.
        classification: report accuracy (argmax of the outputs against the labels).
    """

    loss_fn: LossFn | None = None
    metrics_fn: MetricsFn | None = None
    classification: bool = True

    def figures(self, outputs, labels) -> dict[str, Any]:
        """One value per example of every figure, `loss` first."""
        if self.loss_fn is None:
            loss = optax.softmax_cross_entropy_with_integer_labels(outputs, labels)
        else:
            loss = self.loss_fn(outputs, labels)
        out = {"loss": per_example(loss)}
        if self.classification:
            out["accuracy"] = per_example(jnp.argmax(outputs, -1) == labels)
        if self.metrics_fn is not None:
            out.update({k: per_example(v) for k, v in self.metrics_fn(outputs, labels).items()})
        return out

    def uniform_loss(self, classes: int | None) -> float | None:
        """The default loss of outputs that score `classes` classes alike (ln classes); None
        for a loss of the user's or labels that are not classes."""
        return math.log(classes) if self.loss_fn is None and classes else None


def per_example(values) -> Any:
    """(batch, ...) values -> (batch,): the mean over any positions within an example."""
    values = jnp.asarray(values)
    if values.ndim == 1:
        return values.astype(jnp.float32) if values.dtype == bool else values
    return jnp.mean(values.reshape(values.shape[0], -1), axis=1)
