"""Hardware efficiency: training images/s against learners per device, beside one learner at m x b.

For every model, batch b and m in 1..16: `sma` (m learners at b, SMA) and
`ssgd` (one learner at batch m x b, the most one device can do with the same
images per step). Timed with the auto-tuner's trial (compile, one warm-up
dispatch, median of timed dispatches; nothing is trained) on synthetic
images of the real shape, one device.

    python -m experiments.hardware_efficiency       # LeNet and ResNet-32: slow on a CPU
    crossbow-jax sweep hardware_efficiency --quick
"""

from experiments import _sweep

MODELS = {"lenet": "mnist", "resnet32": "cifar10"}
BATCHES = (8, 16, 32, 64)
LEARNERS = (1, 2, 4, 8, 16)


def get_config(quick: bool = False) -> dict:
    models, batches, learners = MODELS, BATCHES, LEARNERS
    fixed = {
        "dataset": "synthetic",
        "train_examples": 2048,
        "test_examples": 16,
        "num_devices": 1,
        "trial_steps": 8,
        "trial_repeats": 3,
    }
    if quick:
        models, batches, learners = {"lenet": "mnist"}, (8,), (2,)
        fixed.update(train_examples=64, trial_steps=2, trial_repeats=1)
    grid = [
        {
            "model": model,
            "synthetic_like": like,
            "batch_size": b,
            "learners_per_device": m,
            "algorithm": alg,
            "line": f"{alg} b={b}",
        }
        for model, like in models.items()
        for b in batches
        for m in learners
        for alg in ("sma", "ssgd")
    ]
    return {
        "name": "hardware_efficiency",
        "measure": "throughput",
        "fixed": fixed,
        "grid": grid,
        "seeds": 1,
        "caption": "images/s vs learners per device m (sma: m learners at b; ssgd: 1 at m x b)",
        "table": {
            "group": ["model", "batch_size", "learners_per_device", "algorithm"],
            "figures": ["images_per_second", "compile_seconds"],
        },
        "plots": [
            {
                "x": "learners_per_device",
                "y": "images_per_second",
                "series": "line",
                "where": {"model": m},
                "logx": True,
                "title": m,
            }
            for m in models
        ],
    }


if __name__ == "__main__":
    raise SystemExit(_sweep.main("hardware_efficiency"))
