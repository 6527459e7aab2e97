"""The training engine: learners x devices, data on the device, evaluation of z."""

from crossbow_jax.engine.mapping import DEVICE_AXIS, device_map, make_mesh

__all__ = ["DEVICE_AXIS", "device_map", "make_mesh"]
