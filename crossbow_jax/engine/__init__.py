"""The training engine: learners x devices, data on the device, evaluation of z.

- `step.py`: the per-device program as free functions (one step, n steps
  per dispatch, evaluation of the central model).
- `programs.py`: those functions mapped over the devices and compiled;
  `prepare` readies one layout of learners.
- `loop.py`: `fit`, the host loop (plan, dispatch, metrics one dispatch
  late, evaluation, checkpoints); `stage.py`: one layout's compiled programs and
  the run of a plan's dispatches; `history.py`: its rows and progress;
  `result.py`: `TrainResult` and `load_run`.
- `checks.py`, `task.py`: everything checked before any work, and the
  loss and figures of the run.
- `config.py`, `algorithms.py`, `plan.py`, `inputs.py`, `placement.py`,
  `feed.py`, `optimizers.py`, `checkpoint.py`, `mapping.py`,
  `distributed.py`: the settings (and which ones each averaging algorithm
  takes), the cut of a run into dispatches, the user's data, where it lives
  on the devices, the learner optimiser, orbax checkpoints, the device axes
  (hosts x devices) and multi-process runs.
- `traffic.py`: the bytes of collectives per step (mean, peak), read from the compiled step.
- `runfolder.py`, `preemption.py`: the run folder's lock, digests and
  overwrite; SIGTERM/SIGINT noted, saved and reported (`RunInterrupted`).

See docs/design.md for the path of one batch through these files.
"""

from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.history import TrainingDiverged
from crossbow_jax.engine.loop import fit
from crossbow_jax.engine.mapping import (
    DEVICE_AXIS,
    HOST_AXIS,
    device_map,
    make_mesh,
    put_on_devices,
    select_devices,
)
from crossbow_jax.engine.preemption import RunInterrupted
from crossbow_jax.engine.result import TrainResult, load_run
from crossbow_jax.engine.runfolder import CheckpointError

__all__ = [
    "DEVICE_AXIS",
    "HOST_AXIS",
    "CheckpointError",
    "ConfigError",
    "RunInterrupted",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "device_map",
    "fit",
    "load_run",
    "make_mesh",
    "put_on_devices",
    "select_devices",
]
