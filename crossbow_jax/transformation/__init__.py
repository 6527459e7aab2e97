"""Optax transformations over stacked learners: the replica-averaging family (SMA,
local SGD, DiLoCo, SMA inside / DiLoCo across hosts) and the SSGD baseline."""

from crossbow_jax.transformation.central import central_params
from crossbow_jax.transformation._fragments import fragment_sizes
from crossbow_jax.transformation.diloco import DiLoCoState, diloco
from crossbow_jax.transformation.hierarchical import HierarchicalState, hierarchical
from crossbow_jax.transformation.local_sgd import LocalSGDState, local_sgd
from crossbow_jax.transformation.sma import SMAState, sma, sma_average
from crossbow_jax.transformation.ssgd import SSGDState, ssgd

__all__ = [
    "DiLoCoState",
    "HierarchicalState",
    "LocalSGDState",
    "SMAState",
    "SSGDState",
    "central_params",
    "diloco",
    "fragment_sizes",
    "hierarchical",
    "local_sgd",
    "sma",
    "sma_average",
    "ssgd",
]
