"""Optax transformations over stacked learners: SMA and the SSGD baseline."""

from crossbow_jax.transformation.sma import SMAState, sma, sma_average
from crossbow_jax.transformation.ssgd import SSGDState, ssgd

__all__ = ["SMAState", "SSGDState", "sma", "sma_average", "ssgd"]
