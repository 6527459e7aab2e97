"""crossbow_jax: CROSSBOW on JAX.

Many small-batch model replicas ("learners") per device, kept together by
Synchronous Model Averaging (SMA). `train` runs one training run; `sweep`
runs a grid of them into resumable JSONL rows, a table and a plot.
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
from crossbow_jax.sweeps import sweep
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
from crossbow_jax.version import __version__

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
    "sweep",
    "train",
]
