"""The training engine: learners x devices, data on the device, evaluation of z.

- `step.py`: the per-device program as free functions (one step, n steps
  per dispatch, evaluation of the central model).
- `programs.py`: those functions mapped over the devices and compiled;
  `prepare` readies one layout of learners.
- `loop.py`: `fit`, the host loop (plan, dispatch, metrics one dispatch
  late, evaluation, checkpoints); `record.py`: its history and result.
- `config.py`, `plan.py`, `inputs.py`, `placement.py`, `feed.py`,
  `optimizers.py`, `checkpoint.py`, `mapping.py`, `distributed.py`: the
  settings, the cut of a run into dispatches, the user's data, where it
  lives on the devices, the learner optimiser, orbax checkpoints, the
  device axis and multi-process runs.

See docs/design.md for the path of one batch through these files.
"""

from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.loop import fit
from crossbow_jax.engine.mapping import (
    DEVICE_AXIS,
    device_map,
    make_mesh,
    put_on_devices,
    select_devices,
)
from crossbow_jax.engine.record import TrainingDiverged, TrainResult

__all__ = [
    "DEVICE_AXIS",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "device_map",
    "fit",
    "make_mesh",
    "put_on_devices",
    "select_devices",
]
