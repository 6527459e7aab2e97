"""Hardware efficiency: training images/s against learners per device, beside one learner at m x b.

For every model, batch b and m in 1..16: `sma` (m learners at b, SMA) and
`ssgd` (one learner at batch m x b, the most one device can do with the same
images per step). Timed with the auto-tuner's trial (compile, one warm-up
dispatch, median of timed dispatches; nothing is trained) on synthetic
images of the real shape, one device.

ResNet-32's trials time single-step dispatches with fewer steps
(`PER_MODEL`): on a CPU, compiling 16 unrolled ResNet-32 learners takes
about 100 s, and a step of 1,024 images 13-22 s. `MAX_IMAGES` can cap a
model's grid at m x b images per step; it is empty, so the grid is complete.

    python -m experiments.hardware_efficiency       # about 45 minutes on one CPU core
    crossbow-jax sweep hardware_efficiency --quick
"""

from experiments import _sweep

MODELS = {"lenet": "mnist", "resnet32": "cifar10"}
BATCHES = (8, 16, 32, 64)
LEARNERS = (1, 2, 4, 8, 16)
MAX_IMAGES: dict[str, int] = {}
"""Per model: the most images per step (m x b) the grid goes to (none: all)."""
PER_MODEL = {"resnet32": {"steps_per_dispatch": 1, "trial_steps": 4}}
"""Per model: trial settings that replace `fixed` (see the docstring)."""


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
            **({} if quick else PER_MODEL.get(model, {})),
        }
        for model, like in models.items()
        for b in batches
        for m in learners
        if quick or m * b <= MAX_IMAGES.get(model, m * b)
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
        "ratios": [
            {
                "figure": "images_per_second",
                "split": "algorithm",
                "over": ("sma", "ssgd"),
                "rows": "batch_size",
                "cols": "learners_per_device",
                "where": {"model": m},
                "title": f"{m}: images/s of m learners at b over one learner at m x b",
            }
            for m in models
        ],
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
