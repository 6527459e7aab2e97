"""Sensitivity of SMA to its two parameters: the correction step alpha and the central momentum.

k = 16 learners (one device, b = 16), LeNet on the real MNIST, one epoch;
the figure is the test accuracy of the central model after that epoch (and
its curve, evaluated every quarter epoch). alpha in {1/k = 0.0625,
0.1, 0.2} at central momentum 0.9; central momentum in {0, 0.9} at
alpha 0.1. The paper's stability condition is roughly alpha * k < 2, so
alpha = 0.2 (alpha * k = 3.2) is past it. Three seeds per point.

    python -m experiments.sensitivity [--seeds N]
    crossbow-jax sweep sensitivity --quick
"""

from experiments import _sweep

K, BATCH, MNIST_TRAIN = 16, 16, 60_000
ALPHAS = (0.0625, 0.1, 0.2)
MOMENTA = (0.0,)  # 0.9 is the alpha = 0.1 point of the alpha sweep


def get_config(quick: bool = False) -> dict:
    fixed = {
        **_sweep.LENET_MNIST,
        "batch_size": BATCH,
        "algorithm": "sma",
        "learners_per_device": K,
        "epochs": 1,
        "eval_every": MNIST_TRAIN // (K * BATCH) // 4,
        "num_devices": 1,
        "central_momentum": 0.9,
    }
    grid = [{"alpha": a} for a in ALPHAS] + [{"alpha": 0.1, "central_momentum": m} for m in MOMENTA]
    if quick:
        fixed.update(_sweep.QUICK_MNIST, learners_per_device=2, eval_every=0)
        grid = [{"alpha": 0.1}, {"alpha": 0.1, "central_momentum": 0.0}]
    return {
        "name": "sensitivity",
        "measure": "train",
        "fixed": fixed,
        "grid": grid,
        "seeds": 1 if quick else 3,
        "caption": f"SMA sensitivity, LeNet / MNIST, k={fixed['learners_per_device']}, 1 epoch",
        "table": {
            "group": ["alpha", "central_momentum"],
            "figures": ["final_accuracy", "best_accuracy", "images_per_second"],
        },
        "plots": [
            {
                "x": "alpha",
                "y": "final_accuracy",
                "where": {"central_momentum": 0.9},
                "logx": True,
                "title": "accuracy after 1 epoch vs alpha (mu = 0.9)",
                "ylim": (0.95, 1.0),
            },
            {
                "x": "central_momentum",
                "y": "final_accuracy",
                "where": {"alpha": 0.1},
                "title": "accuracy after 1 epoch vs central momentum (alpha = 0.1)",
                "ylim": (0.95, 1.0),
            },
            {
                "kind": "curve",
                "series": "alpha",
                "where": {"central_momentum": 0.9},
                "title": "test accuracy by alpha",
                "ylim": (0.9, 1.0),
            },
        ],
    }


if __name__ == "__main__":
    raise SystemExit(_sweep.main("sensitivity"))
