"""The ImageNet folder loader: decode + augment throughput of the thread pool it replaced
and of grain (threads, worker processes), and the share of a training step the host path
costs (docs/performance.md, "The host path").

Command (from the repository root; about 4 minutes on a 2-core CPU, `--quick` about one)::

    python -m experiments.benchmarks.imagenet_loader [--quick] [--out results/benchmarks]

It writes synthetic JPEGs at ImageNet's sizes (500x375, 375x500, 500x333 and 500x500,
quality 90, smooth content with noise: about 60-100 KB a file, like ILSVRC-2012's) into
a temporary `imagenet/train/<wnid>/` folder, then:

- loaders: one epoch of 224x224 random-resized crops and flips in batches of 64, read
  by (a) the thread pool the project used before grain (rewritten here from the removed
  `ImageNetSource.epoch`: a `ThreadPoolExecutor` of one thread per core decoding each
  image, two batches ahead), (b) grain with threads of this process
  (`num_workers=0`) and (c) grain with worker processes (`num_workers` = the default,
  the host's cores less one, or 1 where the default is threads). Figures: images/s after the first batch, and the
  seconds to the first batch (grain's workers start then);
- host share: `crossbow_jax.train` on the folder (a small CNN of this script, 1 device,
  2 learners at batch 16: 32 images a step) with the default `data_workers`; the share is the
  time the loop waited for the feeder's batches over the loop's time.

One process, one measurement after another; ratios are within this run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import tempfile
import time

import numpy as np

SIZES = ((375, 500), (500, 375), (333, 500), (500, 500))


def make_folder(root: pathlib.Path, images: int, classes: int = 8) -> None:
    """`images` JPEGs under `root/imagenet/{train,val}/<wnid>/` at ImageNet's sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(classes, images // 8))):
        for i in range(count):
            folder = root / "imagenet" / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            h, w = SIZES[i % len(SIZES)]
            coarse = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), float)
            pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)


def thread_pool_epoch(source, epoch: int, threads: int, prefetch: int = 2):
    """The loader before grain: each image decoded on a thread pool, batches ahead."""
    from crossbow_jax.data.streaming import epoch_order

    order = epoch_order(source.seed, epoch, len(source))
    b = source.batch_size
    batches = [order[i : i + b] for i in range(0, len(order) - b + 1, b)]

    def load(i):
        rng = np.random.default_rng([source.seed, epoch, int(i)])
        return source.decode(source.files[int(i)], rng)[0]

    pending = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for batch in batches:
            pending.append(([pool.submit(load, i) for i in batch], source.index.labels[batch]))
            if len(pending) > prefetch:
                futures, labels = pending.pop(0)
                yield np.stack([f.result() for f in futures]), labels
        for futures, labels in pending:
            yield np.stack([f.result() for f in futures]), labels


def measure(batches) -> dict[str, float]:
    """Seconds to the first batch, and images/s over the rest."""
    started = time.perf_counter()
    first = next(batches)[0]
    after_first = time.perf_counter()
    images = sum(len(x) for x, _ in batches)
    rest = time.perf_counter() - after_first
    assert first.shape[1:] == (224, 224, 3)
    return {"first_batch_s": after_first - started, "images": images,
            "images_per_s": images / rest}  # fmt: skip


def loaders(root: pathlib.Path) -> dict[str, dict[str, float]]:
    from crossbow_jax.data import load_imagenet
    from crossbow_jax.data.streaming import default_workers

    cores, workers = os.cpu_count() or 1, max(1, default_workers())
    rows = {}
    source = load_imagenet(data_dir=str(root), batch_size=64, num_workers=0)
    rows[f"thread pool ({cores} threads, before grain)"] = measure(
        thread_pool_epoch(source, 0, cores))
    rows["grain, threads (num_workers=0)"] = measure(source.epoch(0))
    processes = load_imagenet(data_dir=str(root), batch_size=64, num_workers=workers)
    rows[f"grain, {workers} worker process(es)"] = measure(processes.epoch(0))
    return rows


def host_share(root: pathlib.Path, steps: int) -> dict[str, float]:
    """The share of the training loop's time spent waiting for the host's batches."""
    import flax.linen as nn

    import crossbow_jax
    from crossbow_jax.engine import feed

    class SmallCNN(nn.Module):
        classes: int = 8

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (7, 7), strides=(4, 4))(x))
            x = nn.relu(nn.Conv(32, (3, 3), strides=(2, 2))(x))
            return nn.Dense(self.classes)(x.mean(axis=(1, 2)))

    waited, real_next = [0.0], feed.Feeder.next

    def timed_next(self, chunk):
        started = time.perf_counter()
        try:
            return real_next(self, chunk)
        finally:
            waited[0] += time.perf_counter() - started

    images = len(crossbow_jax.data.load_imagenet(data_dir=str(root), num_workers=0))
    feed.Feeder.next = timed_next
    try:
        result = crossbow_jax.train(
            SmallCNN(), "imagenet", data_dir=str(root), batch_size=16, learners_per_device=2,
            num_devices=1, epochs=steps * 32 / images, eval_every=0, progress=False,
            execution="unroll",
        )  # fmt: skip
    finally:
        feed.Feeder.next = real_next
    loop = result.wall_time
    return {"steps": result.steps, "loop_s": loop, "waited_s": waited[0],
            "share": waited[0] / loop, "images_per_s": result.images_per_second}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="256 images, 16 steps")
    parser.add_argument("--out", default="experiments/results/benchmarks")
    args = parser.parse_args()
    images, steps = (256, 16) if args.quick else (1024, 64)
    with tempfile.TemporaryDirectory() as folder:
        root = pathlib.Path(folder)
        make_folder(root, images)
        sizes = [p.stat().st_size for p in (root / "imagenet" / "train").rglob("*.JPEG")]
        report = {"device": f"{os.cpu_count()}-core CPU", "images": images,
                  "mean_jpeg_kb": float(np.mean(sizes)) / 1024,
                  "loaders": loaders(root), "host_share": host_share(root, steps)}  # fmt: skip
    base = next(iter(report["loaders"].values()))["images_per_s"]
    for name, row in report["loaders"].items():
        row["ratio_to_thread_pool"] = row["images_per_s"] / base
        print(f"{name:45s} {row['images_per_s']:8.1f} img/s ({row['ratio_to_thread_pool']:.2f}x)"
              f", first batch {row['first_batch_s']:.2f} s")  # fmt: skip
    share = report["host_share"]
    print(f"host share of the loop: {share['share']:.1%} ({share['waited_s']:.1f} of "
          f"{share['loop_s']:.1f} s, {share['steps']} steps)")  # fmt: skip
    if not args.quick:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "imagenet_loader.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
