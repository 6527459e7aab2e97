"""Statistical efficiency with ResNet-32 on fashion_mnist32 (Fashion-MNIST padded to 32x32x3,
a stand-in for CIFAR-10): the `statistical_efficiency` grid with the paper's ResNet-32
learner settings.

b = 64 per learner, lr 0.1, momentum 0.9, weight decay 1e-4, alpha 0.1,
central momentum 0.9; k in {1, 4, 16}; `ssgd_scaled` uses lr 0.1 x k with a
1-epoch warm-up. Target 0.92 test accuracy, an assumed point just under the
plateau of ResNets on Fashion-MNIST (about 0.93-0.95 in the literature; not
measured here), at most 30 epochs, evaluated at epoch ends (an evaluation of
10k test images costs as much as a slice of an epoch on a CPU). Far too slow
for a 2-core CPU (docs/results.md); meant for a GPU machine.

    python -m experiments.statistical_efficiency_resnet32
    crossbow-jax sweep statistical_efficiency_resnet32 --quick    # ~1-2 minutes on a CPU
"""

from experiments import _sweep, statistical_efficiency

KS, BATCH, LR = (1, 4, 16), 64, 0.1


def get_config(quick: bool = False) -> dict:
    config = statistical_efficiency.get_config(quick)
    fixed = dict(config["fixed"], model="resnet32")
    if quick:  # one learner, the smallest run that compiles and trains ResNet-32
        fixed.update(synthetic_like="fashion_mnist32", train_examples=32, test_examples=16)
        grid = [p for p in config["grid"] if p["k"] == 2 and p["variant"] != "ssgd_scaled"]
        grid = [dict(p, k=1, learners_per_device=1) for p in grid]
    else:
        fixed.update(dataset="fashion_mnist32", batch_size=BATCH, learning_rate=LR,
                     epochs=30, target_accuracy=0.92)  # fmt: skip
        grid = statistical_efficiency.points(KS, BATCH, LR, None)
    config["plots"][0]["cap"] = fixed["epochs"]
    config["plots"][1].update(where={"k": max(KS)}, title=f"test accuracy, k={max(KS)}",
                              ylim=(0.8, 0.95))  # fmt: skip
    return dict(
        config,
        name="statistical_efficiency_resnet32",
        fixed=fixed,
        grid=grid,
        seeds=1 if quick else 3,
        caption="ResNet-32 / fashion_mnist32 (CIFAR-10 stand-in): epochs to 0.92 test accuracy",
    )


if __name__ == "__main__":
    raise SystemExit(_sweep.main("statistical_efficiency_resnet32"))
