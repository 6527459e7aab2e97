"""The package's version (one place: `crossbow_jax.__version__` and the sweeps' rows read it)."""

__version__ = "0.1.0"
