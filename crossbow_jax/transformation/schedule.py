"""The sync schedule the family's transformations branch on, public for the engine, which
counts a run's syncs by it (`crossbow_jax.engine.traffic`): `sync_branch` (what an update
synchronises, as a branch index: 0 nothing, 1 + f fragment f) and `branch_counts` (how many
updates of a range take each branch). Both are defined in `_period`."""

from crossbow_jax.transformation._period import branch_counts, sync_branch

__all__ = ["branch_counts", "sync_branch"]
