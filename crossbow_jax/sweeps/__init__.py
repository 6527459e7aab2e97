"""Sweeps: a grid of training runs (or throughput trials) -> resumable JSONL rows -> plot + table.

A sweep is a plain dict, usually returned by `get_config(quick)` in a sweep
file (`crossbow-jax sweep path/to/my_sweep.py`) or passed to
`crossbow_jax.sweep(config)` from a notebook (docs/sweeps.md):

    name     the sweep's name: its rows go to `<out>/<name>.jsonl` (a sweep
             file's stem when absent)
    grid     one dict per point; `TrainConfig` and data keys are settings that
             override `fixed`, any other key (e.g. `variant`, `k`) is a label
             for tables and plots, and `seeds` caps the seeds of that point
    fixed    settings shared by every run: `TrainConfig` fields, plus `model`,
             `dataset`, `train_examples`, `test_examples`, `synthetic_like`
    measure  "train" (default: a `crossbow_jax.train` run) or "throughput"
             (one timed trial of the auto-tuner's `run_trial`, no training;
             `trial_steps` and `trial_repeats` are then settings too)
    seeds    seeds per point (default 1; the `--seeds` flag overrides it)
    devices  optional: simulated CPU devices the sweep needs
    reuse    optional: names of other sweeps in the same folder whose rows
             with the same settings and seed are copied instead of run again
    caption, table, plots, ratios  how the rows are summarised
             (`crossbow_jax.sweeps.report`; `table` defaults to one line per
             combination of labels)

A run is identified by the hash of its full settings and seed; a row whose
key is already in the file is skipped, so a stopped sweep resumes.
"""

from crossbow_jax.sweeps import report
from crossbow_jax.sweeps.config import (
    DATA_KEYS,
    TRIAL_KEYS,
    check_config,
    load_sweep_file,
    parse_shard,
)
from crossbow_jax.sweeps.runner import (
    DEFAULT_OUT,
    MEASURES,
    ensure_devices,
    environment,
    expand,
    read_rows,
    sweep,
)

__all__ = [
    "DATA_KEYS",
    "DEFAULT_OUT",
    "MEASURES",
    "TRIAL_KEYS",
    "check_config",
    "ensure_devices",
    "environment",
    "expand",
    "load_sweep_file",
    "parse_shard",
    "read_rows",
    "report",
    "sweep",
]
