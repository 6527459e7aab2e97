"""Device scaling on simulated CPU devices: the same k = 16 learners split over 1, 2, 4, 8 devices.

(devices, learners per device) in {(1, 16), (2, 8), (4, 4), (8, 2)}: LeNet on
the real MNIST, b = 16, alpha 0.1, one epoch, evaluated every quarter epoch,
three seeds.
The devices are simulated (`XLA_FLAGS=--xla_force_host_platform_device_count=8`,
set here before JAX starts unless already set) and all share the same CPU
cores: this checks that hierarchical SMA (per-device reduction, then one
all-reduce) gives the same statistical behaviour however the learners are
split; it measures no speed-up.

    python -m experiments.device_scaling
    crossbow-jax sweep device_scaling --quick
"""

from crossbow_jax.sweeps import ensure_devices
from experiments import _sweep

DEVICES = 8
ensure_devices(DEVICES)  # before anything imports and starts JAX

K, BATCH, MNIST_TRAIN = 16, 16, 60_000


def get_config(quick: bool = False) -> dict:
    fixed = {
        **_sweep.LENET_MNIST,
        "batch_size": BATCH,
        "algorithm": "sma",
        "alpha": 0.1,
        "epochs": 1,
        "eval_every": MNIST_TRAIN // (K * BATCH) // 4,
    }
    grid = [{"num_devices": d, "learners_per_device": K // d} for d in (1, 2, 4, 8)]
    if quick:
        fixed.update(_sweep.QUICK_MNIST, eval_every=0)
        grid = [{"num_devices": d, "learners_per_device": 2 // d} for d in (1, 2)]
    return {
        "name": "device_scaling",
        "measure": "train",
        "devices": DEVICES,
        "fixed": fixed,
        "grid": grid,
        "seeds": 1 if quick else 3,
        "caption": "same k learners over 1-8 simulated CPU devices (sharing 2 cores): "
        "statistical behaviour, not speed-up",
        "table": {
            "group": ["num_devices", "learners_per_device"],
            "figures": ["final_accuracy", "best_accuracy", "images_per_second"],
        },
        "plots": [
            {
                "x": "num_devices",
                "y": "final_accuracy",
                "logx": True,
                "title": "test accuracy of z after 1 epoch",
                "ylim": (0.95, 1.0),
            },
            {
                "x": "num_devices",
                "y": "images_per_second",
                "logx": True,
                "title": "images/s (simulated devices, shared cores)",
                "ylim": (0, None),
            },
            {
                "kind": "curve",
                "series": "num_devices",
                "title": "test accuracy by devices",
                "ylim": (0.9, 1.0),
            },
        ],
    }


if __name__ == "__main__":
    raise SystemExit(_sweep.main("device_scaling"))
