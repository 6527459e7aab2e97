"""The training engine: learners x devices, data on the device, evaluation of z."""

from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.loop import TrainingDiverged, TrainResult, train
from crossbow_jax.engine.mapping import DEVICE_AXIS, device_map, make_mesh, put_on_devices

__all__ = [
    "DEVICE_AXIS",
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "device_map",
    "make_mesh",
    "put_on_devices",
    "train",
]
