"""crossbow_jax: CROSSBOW on JAX.

Many small-batch model replicas ("learners") per device, kept together by
Synchronous Model Averaging (SMA).
"""

from crossbow_jax.api import train
from crossbow_jax.engine import (
    CheckpointError,
    ConfigError,
    RunInterrupted,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    load_run,
)
from crossbow_jax.transformation import (
    DiLoCoState,
    HierarchicalState,
    LocalSGDState,
    SMAState,
    SSGDState,
    central_params,
    diloco,
    hierarchical,
    local_sgd,
    sma,
    sma_average,
    ssgd,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DiLoCoState",
    "HierarchicalState",
    "LocalSGDState",
    "RunInterrupted",
    "SMAState",
    "SSGDState",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "__version__",
    "central_params",
    "diloco",
    "hierarchical",
    "load_run",
    "local_sgd",
    "sma",
    "sma_average",
    "ssgd",
    "train",
]
