"""Benchmark scripts for crossbow_jax (docs/performance.md shows their results).

Each script runs as `python -m experiments.benchmarks.NAME [--quick] [--out DIR]`
from the repository root, prints a table and writes its rows as JSON:

- `engine_overhead`: the training loop against the bare compiled step, SMA
  against a plain per-learner optimiser, and a rolled against an unrolled
  `lax.scan` over steps.
- `learner_efficiency`: m learners at batch b against one learner at batch
  m*b (hardware efficiency), for `vmap` and `unroll` execution.

Shared pieces: `_timing` (clocks, interleaved repeats, output) and `_engine`
(the engine's own compiled programs, stepped back to back).
"""
