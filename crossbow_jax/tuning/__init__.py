"""Auto-tuning the number of learners per device (CROSSBOW's rule, by measurement).

- `search`: the pure decision rule (`Search`, `decide`), testable on recorded curves.
- `measure`: one trial on the devices (`run_trial`, memory estimate and guard).
- `tuner`: `tune` (tune only) and `choose_learners` (what
  `train(..., learners_per_device="auto")` calls).
- `report`: the table, `tuning.json` and the PNG plot.

See docs/tuning.md.
"""

from crossbow_jax.tuning.measure import Trial, free_memory, program_memory, run_trial
from crossbow_jax.tuning.report import format_table, plot_curve, read_json, write_json
from crossbow_jax.tuning.search import STRATEGIES, Decision, Search, decide, gains_enough
from crossbow_jax.tuning.tuner import choose_learners, search_learners, tune

__all__ = [
    "STRATEGIES",
    "Decision",
    "Search",
    "Trial",
    "choose_learners",
    "decide",
    "format_table",
    "free_memory",
    "gains_enough",
    "plot_curve",
    "program_memory",
    "read_json",
    "run_trial",
    "search_learners",
    "tune",
    "write_json",
]
