"""The replica-averaging family side by side: which members keep SMA's statistical
efficiency, at which communication cost.

k = 16 learners at b = 16 (4 simulated CPU devices x 4 learners), LeNet on the
real MNIST, target 99% test accuracy of the central model, at most 8 epochs,
evaluated every half epoch; learner settings as in `statistical_efficiency`
(lr 0.01, momentum 0.9, weight decay 1e-4). Members:

    ssgd        one learner per device at batch 64 (B = 256), lr x 16, 1-epoch warm-up
    sma         alpha 0.1, central momentum 0.9; sync_every 1, 4, 16
    local_sgd   the learners averaged every H = 4, 16 steps
    diloco      an outer Nesterov step (0.7, 0.9) every H = 16, 64 steps

and DiLoCo's options at H = 16 (docs/sma.md, "Options of the family"): 4
fragments (Streaming DiLoCo), the outer gradient sent as bf16, int8 or int4
(int8 and int4 with and without error feedback), participation 0.75, and the
outer step overlapped with one inner step.

Every row records the mean and the peak bytes one device sends per step (by
mesh axis, every collective), read from the compiled step. Three seeds per point (`--seeds N` for another count).

    python -m experiments.algorithms
    crossbow-jax sweep algorithms --quick      # CI: seconds, synthetic data
"""

from crossbow_jax.sweeps import ensure_devices
from experiments import _sweep

DEVICES, LEARNERS, BATCH, LR = 4, 4, 16, 0.01
K, MNIST_TRAIN = DEVICES * LEARNERS, 60_000
ensure_devices(8)  # before anything imports and starts JAX

MEMBERS = (
    ("ssgd", 1),
    ("sma", 1),
    ("sma", 4),
    ("sma", 16),
    ("local_sgd", 4),
    ("local_sgd", 16),
    ("diloco", 16),
    ("diloco", 64),
)
OPTIONS = (  # DiLoCo at H = 16 with one option each: (label, settings)
    ("fragments=4", {"fragments": 4}),
    ("bf16", {"compress": "bf16"}),
    ("int8", {"compress": "int8"}),
    ("int8 no feedback", {"compress": "int8", "error_feedback": False}),
    ("int4", {"compress": "int4"}),
    ("int4 no feedback", {"compress": "int4", "error_feedback": False}),
    ("participation=0.75", {"participation": 0.75}),
    ("overlap=1", {"overlap": 1}),
)


def point(family: str, period: int, lr: float, option: str = "-", **settings) -> dict:
    """One member: its labels, algorithm and settings (`option` names DiLoCo's settings)."""
    variant = f"{family} H={period}" + ("" if option == "-" else f" {option}")
    p = {"variant": variant, "family": family, "period": period, "option": option,
         "algorithm": family, **settings}  # fmt: skip
    if family == "ssgd":
        return {**p, "learning_rate": lr * K, "warmup_epochs": 1.0}
    if family == "sma":
        p["alpha"] = 0.1
    return {**p, "sync_every": period}


def get_config(quick: bool = False) -> dict:
    fixed = {
        **_sweep.LENET_MNIST,
        "batch_size": BATCH,
        "learning_rate": LR,
        "num_devices": DEVICES,
        "learners_per_device": LEARNERS,
        "execution": "unroll",  # the same program shape for every member and seed
        "epochs": 8,
        "target_accuracy": 0.99,
        "eval_every": MNIST_TRAIN // (K * BATCH) // 2,
    }
    grid = [point(f, h, LR) for f, h in MEMBERS]
    grid += [point("diloco", 16, LR, label, **o) for label, o in OPTIONS]
    seeds = 3
    if quick:
        fixed.update(_sweep.QUICK_MNIST, epochs=1, eval_every=0, num_devices=1,
                     learners_per_device=2)  # fmt: skip
        grid = [point(f, h, LR) for f, h in (("local_sgd", 4), ("diloco", 4))]
        grid += [point("diloco", 4, LR, "int4 fragments=2", compress="int4", fragments=2)]
        seeds = 1
    return {
        "name": "algorithms",
        "measure": "train",
        "devices": 8,
        "fixed": fixed,
        "grid": grid,
        "seeds": seeds,
        "caption": "LeNet / MNIST, k = 16 learners at b = 16 (4 simulated CPU devices x 4): "
        "epochs to 99% test accuracy of the central model, mean and peak bytes one device "
        "sends per step",
        "table": {
            "group": ["family", "period", "option"],
            "figures": [
                "epochs_to_target",
                "final_accuracy",
                "all_reduce_bytes",
                "peak_bytes",
                "images_per_second",
            ],
        },
        "plots": [
            {
                "x": "period",
                "y": "epochs_to_target",
                "series": "family",
                "where": {"option": "-"},
                "logx": True,
                "cap": fixed["epochs"],
                "title": "epochs to 99% (mean ± std of runs that reached it)",
                "legend": "center right",  # "best" hides the ssgd point at period 1
            },
            {
                "x": "period",
                "y": "all_reduce_bytes",
                "series": "family",
                "where": {"option": "-"},
                "logx": True,
                "title": "bytes one device sends per step (mean)",
                "ylim": (0, None),
            },
            {
                "kind": "curve",
                "series": "variant",
                "where": {"option": "-"},
                "title": "test accuracy of the central model",
                "ylim": (0.97, 1.0),
            },
            {
                "kind": "curve",
                "series": "variant",
                "where": {"family": "diloco", "period": 16},
                "title": "DiLoCo H=16 and its options: test accuracy",
                "ylim": (0.97, 1.0),
            },
        ],
    }


if __name__ == "__main__":
    raise SystemExit(_sweep.main("algorithms"))
