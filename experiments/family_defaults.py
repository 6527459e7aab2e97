"""Does every member of the family train with its defaults?

Each member (sma, local_sgd, diloco, hierarchical on 2 simulated hosts, ssgd)
trains with nothing set but `algorithm=` and, where it needs one, `sync_every=H`
(H = 4, 16, 64): LeNet and the Flax Linen `examples/mnist` CNN on the real
MNIST, 12,000 training and 2,000 test images, 2 epochs, 2 simulated CPU
devices x 4 learners (the default learners per device, k = 8), 3 seeds. The
only setting that is not a default is `execution="unroll"` (what `auto`
picks on a CPU, without the timing). Every run's final test accuracy and
loss of the central model go to `experiments/results/family_defaults.json`
(a run already there is skipped, so a stopped sweep resumes), and the
table of means is printed.

    python -m experiments.family_defaults                  # the grid (about 2 hours, 2 cores)
    python -m experiments.family_defaults --quick          # 1 seed, LeNet, H = 4 (minutes)
    python -m experiments.family_defaults --quick --extra "momentum=0" --extra "outer_momentum=0.5"
                                                           # candidate settings, on top of the defaults

`--extra NAME=VALUE[,NAME=VALUE]` adds a variant with those settings (it may
repeat); `--members`, `--models`, `--periods`, `--seeds` narrow the grid.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from crossbow_jax.sweeps import ensure_devices, environment

ensure_devices(2)  # before anything imports and starts JAX

import flax.linen as nn

RESULTS = Path(__file__).resolve().parent / "results" / "family_defaults.json"
MEMBERS = ("sma", "local_sgd", "diloco", "hierarchical", "ssgd")
PERIODIC = ("local_sgd", "diloco", "hierarchical")
PERIODS = (4, 16, 64)
FIXED = {"epochs": 2, "num_devices": 2, "execution": "unroll", "progress": False}


class LinenCNN(nn.Module):
    """The CNN of Flax Linen's `examples/mnist/train.py` (two 3x3 convolutions of 32 and
    64 features with 2x2 average pooling, a dense layer of 256, 10 outputs), rewritten
    here; the example's structure, not its code."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no dropout or batch statistics
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


MODELS = {"lenet": lambda: "lenet", "linen_cnn": LinenCNN}


def parse_extra(text: str) -> dict:
    """'momentum=0,outer_momentum=0.5' -> {'momentum': 0.0, 'outer_momentum': 0.5}."""
    pairs = (item.split("=", 1) for item in text.split(",") if item)
    return {k.strip(): float(v) for k, v in pairs}


def runs(args) -> list[dict]:
    """The grid, one dict per run (labels only: the settings follow from them)."""
    out = []
    for seed in range(args.seeds):
        for model in args.models:
            for member in args.members:
                for period in args.periods if member in PERIODIC else (None,):
                    for extra in [""] + args.extra:
                        out.append({"member": member, "model": model, "H": period,
                                    "extra": extra, "seed": seed})  # fmt: skip
    return out


def key(run: dict) -> str:
    return json.dumps(run, sort_keys=True)


def train_one(run: dict, data) -> dict:
    """One run: the member's defaults (plus `extra`), its final accuracy and loss."""
    import crossbow_jax

    options = {**FIXED, "algorithm": run["member"], "seed": run["seed"]}
    if run["H"] is not None:
        options["sync_every"] = run["H"]
    if run["member"] == "hierarchical":
        options["hosts"] = 2
    options.update(parse_extra(run["extra"]))
    try:
        result = crossbow_jax.train(MODELS[run["model"]](), *data, **options)
    except crossbow_jax.TrainingDiverged as error:
        return {"accuracy": None, "test_loss": None, "error": str(error).splitlines()[0]}
    return {
        "accuracy": float(result.accuracy),
        "test_loss": float(result.test_loss),
        "seconds": round(float(result.wall_time), 1),
        "compile_seconds": round(float(result.compile_time), 1),
    }


def table(rows: list[dict]) -> str:
    """Mean (min-max) final accuracy per member, H and variant, by model."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["member"], r["H"] or 1, r["extra"], r["model"]), []).append(r)
    lines = ["| member | H | settings beyond the defaults | model | seeds | accuracy: mean (min-max) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (member, period, extra, model), rs in sorted(groups.items(), key=lambda g: (
            MEMBERS.index(g[0][0]), g[0][1], g[0][2], g[0][3])):  # fmt: skip
        accs = [0.0 if r["accuracy"] is None else r["accuracy"] for r in rs]
        diverged = sum(r["accuracy"] is None for r in rs)
        note = f", {diverged} diverged" if diverged else ""
        lines.append(
            f"| {member} | {period} | {extra or '-'} | {model} | {len(rs)} | "
            f"{statistics.mean(accs):.4f} ({min(accs):.4f}-{max(accs):.4f}){note} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, LeNet, H = 4")
    parser.add_argument("--members", nargs="+", choices=MEMBERS, default=list(MEMBERS))
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--periods", nargs="+", type=int, default=list(PERIODS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=VALUE,...")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.models, args.periods = 1, ["lenet"], [4]

    import jax

    from crossbow_jax import data

    # Seeds of a setting compile the same programs: compile them once (compiling LeNet's
    # unrolled learners took about half of a run on the shared 2-core CPU).
    jax.config.update(
        "jax_compilation_cache_dir", os.path.join(tempfile.gettempdir(), "family_defaults_xla")
    )
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    ds = data.load_dataset("mnist")
    split = ((ds.train_images[:12000], ds.train_labels[:12000]),
             (ds.test_images[:2000], ds.test_labels[:2000]))  # fmt: skip
    done = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    have = {key(r["run"]) for r in done["runs"]}
    for run in runs(args):
        if key(run) in have:
            continue
        figures = train_one(run, split)
        print(run, figures, flush=True)
        done["environment"] = environment()
        done["runs"].append({"run": run, **figures})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(done, indent=1))
    wanted = {key(r) for r in runs(args)}
    print(table([{**r["run"], **r} for r in done["runs"] if key(r["run"]) in wanted]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
