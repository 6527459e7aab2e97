"""Test set-up: 8 simulated CPU devices, set before JAX is first imported."""

import os

from crossbow_jax.engine.mapping import simulated_devices_flags

os.environ["XLA_FLAGS"] = simulated_devices_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
