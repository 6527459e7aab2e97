"""Time to accuracy: wall-clock seconds until the central model reaches the target, SMA vs SSGD.

The runs are those of `statistical_efficiency` (same grid, same machine and
device); rows already measured there are copied, not run again. Times count
from the start of the run, compilation included, on a CPU shared with other
jobs: compare within one sweep, treat absolute times as noisy.

    python -m experiments.time_to_accuracy          # after (or instead of) statistical_efficiency
    crossbow-jax sweep time_to_accuracy --quick
"""

from experiments import _sweep, statistical_efficiency


def get_config(quick: bool = False) -> dict:
    base = statistical_efficiency.get_config(quick)
    return {
        **base,
        "name": "time_to_accuracy",
        "reuse": ["statistical_efficiency"],
        "caption": base["caption"].replace("epochs to", "wall-clock seconds to"),
        "table": {
            "group": ["k", "variant"],
            "figures": ["time_to_target", "epochs_to_target", "images_per_second", "compile_time"],
        },
        "plots": [
            {
                "x": "k",
                "y": "time_to_target",
                "series": "variant",
                "logx": True,
                "ylabel": "seconds to target",
                "title": "time to target (runs that reached it)",
            },
            {
                "x": "k",
                "y": "images_per_second",
                "series": "variant",
                "logx": True,
                "title": "training images/s",
            },
        ],
    }


if __name__ == "__main__":
    raise SystemExit(_sweep.main("time_to_accuracy"))
