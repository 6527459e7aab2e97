"""Statistical efficiency: epochs to a target test accuracy, SMA vs SSGD, k = 1..16 learners.

For each k, three ways to use k x b images per step (one device):
`sma` (k learners at batch b, SMA with alpha 0.1), `ssgd` (one learner at
batch k x b with the same learner hyper-parameters) and `ssgd_scaled` (the
same with the learning rate scaled by k and a 1-epoch linear warm-up).
LeNet on the real MNIST, target 99% test accuracy of the central model,
at most 10 epochs, evaluated every half epoch. Learner settings (all
variants): b = 16, lr 0.01, momentum 0.9, weight decay 1e-4; SMA: alpha 0.1,
central momentum 0.9. Three seeds per point (`--seeds N` for another count).

    python -m experiments.statistical_efficiency
    crossbow-jax sweep statistical_efficiency --quick      # CI: seconds, synthetic data
"""

from experiments import _sweep

KS = (1, 2, 4, 8, 16)
BATCH, LR, ALPHA = 16, 0.01, 0.1
MNIST_TRAIN = 60_000


def points(ks, batch: int, lr: float, n_train: int | None) -> list[dict]:
    """The grid: for each k, `sma`, `ssgd` and (k > 1) `ssgd_scaled` (lr x k, 1-epoch warm-up).

    With `n_train` the runs are evaluated twice an epoch, else at epoch ends.
    """
    grid = []
    for k in ks:
        half_epoch = n_train // (k * batch) // 2 if n_train else 0
        common = {"k": k, "learners_per_device": k, "eval_every": half_epoch}
        grid.append({"variant": "sma", "algorithm": "sma", "alpha": ALPHA, **common})
        grid.append({"variant": "ssgd", "algorithm": "ssgd", **common})
        if k > 1:
            scaled = {"learning_rate": lr * k, "warmup_epochs": 1.0}
            grid.append({"variant": "ssgd_scaled", "algorithm": "ssgd", **common, **scaled})
    return grid


def get_config(quick: bool = False) -> dict:
    fixed = {
        **_sweep.LENET_MNIST,
        "batch_size": BATCH,
        "learning_rate": LR,
        "epochs": 10,
        "target_accuracy": 0.99,
        "num_devices": 1,
    }
    grid, seeds = points(KS, BATCH, LR, MNIST_TRAIN), 3
    if quick:
        fixed.update(_sweep.QUICK_MNIST, epochs=1)
        grid, seeds = points((2,), 8, LR, None), 1
        for p in grid:
            p["warmup_epochs"] = min(p.get("warmup_epochs", 0.0), 0.5)
    return {
        "name": "statistical_efficiency",
        "measure": "train",
        "fixed": fixed,
        "grid": grid,
        "seeds": seeds,
        "caption": "LeNet / MNIST: epochs to 99% test accuracy (1 device, b=16 per learner)",
        "table": {
            "group": ["k", "variant"],
            "figures": ["epochs_to_target", "best_accuracy", "final_accuracy", "images_per_second"],
        },
        "plots": [
            {
                "x": "k",
                "y": "epochs_to_target",
                "series": "variant",
                "logx": True,
                "cap": fixed["epochs"],
                "title": "epochs to target (mean ± std of runs that reached it)",
            },
            {
                "kind": "curve",
                "series": "variant",
                "where": {"k": max(k for k in KS)},
                "title": f"test accuracy, k={max(KS)}",
                "ylim": (0.97, 1.0),
            },
        ],
    }


if __name__ == "__main__":
    raise SystemExit(_sweep.main("statistical_efficiency"))
