"""Random-access sources (a class of one's own, grain, Hugging Face) read through grain:
the same training as arrays, exact resume after kill -9 mid-epoch, checks before any work."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
from _engine_fixtures import MLP, subprocess_xla_flags
from _source_fixtures import RUN, BlobSource, blob_sources, source_run

import crossbow_jax
from crossbow_jax.data.streaming import Records, StreamedSource
from crossbow_jax.engine import ConfigError, runfolder
from crossbow_jax.engine.inputs import resolve_data
from crossbow_jax.engine.sources import SourceOptions

HERE = Path(__file__).resolve().parent
FAST = {k: v for k, v in RUN.items() if k not in ("checkpoint_every", "eval_every")}


def leaves(result):
    return [np.asarray(a) for a in jax.tree.leaves(result.params)]


def test_streamed_sources_train_exactly_as_their_arrays():
    """A class with __len__/__getitem__ and a grain MapDataset over it, streamed from the
    host, take the batches the arrays take: the same model to the bit."""
    train, test = blob_sources()
    arrays = crossbow_jax.train(MLP(), (train.x, train.y), (test.x, test.y), **FAST)
    plain = crossbow_jax.train(MLP(), train, test, data_workers=0, **FAST)
    mapped = grain.MapDataset.source(train).map(lambda r: (r["x"], r["label"]))
    grained = crossbow_jax.train(MLP(), mapped, test, data_workers=0, **FAST)
    for other in (plain, grained):
        for a, b in zip(leaves(arrays), leaves(other), strict=True):
            np.testing.assert_array_equal(a, b)
        assert other.accuracy == arrays.accuracy > 0.5
    assert plain.history[-1]["loss"] < plain.history[0]["loss"]


def _hugging_face(n, seed):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = [np.clip(rng.normal(60 + 60 * c, 20, (12, 12)), 0, 255).astype(np.uint8)
              for c in labels]  # fmt: skip
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=3)}
    )
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_hugging_face_dataset_is_placed_whole_or_streamed():
    train, test = _hugging_face(192, 0), _hugging_face(48, 1)
    placed = resolve_data(train, test, sources=SourceOptions(None, 0, "auto"))
    assert placed.train_x.shape == (192, 12, 12, 1) and placed.train_x.dtype == np.uint8
    assert placed.num_classes == 3 and placed.stream is None
    assert placed.name == "Dataset source"
    streamed = resolve_data(train, test, sources=SourceOptions(None, 0, "host"))
    assert streamed.train_x is None and streamed.num_train == 192
    assert streamed.example.shape == (1, 12, 12, 1) and streamed.test_x.shape == (48, 12, 12, 1)
    result = crossbow_jax.train(MLP(classes=3), train, test, data_workers=0, epochs=4,
                                **{k: v for k, v in FAST.items() if k != "epochs"})  # fmt: skip
    assert result.accuracy > 0.9


def test_records_resumed_at_another_step_size_are_each_read_once():
    """An elastic resume changes the step's images mid-epoch: the epoch's order goes on
    from the image reached, so the epoch is still one pass."""
    marks = Records(_Marked(256))
    first = StreamedSource(marks, 12, seed=5, workers=0)
    taken = [y for _, (x, y) in zip(range(7), first.epoch(2))]  # 84 images
    first.close()
    rest = list(StreamedSource(marks, 20, seed=5, workers=0).epoch(2, start_image=84))
    seen = np.concatenate(taken + [y for _, y in rest])
    assert len(seen) == 84 + (256 - 84) // 20 * 20 and len(set(seen.tolist())) == len(seen)
    whole = np.concatenate([y for _, y in StreamedSource(marks, 4, 5, workers=0).epoch(2)])
    np.testing.assert_array_equal(seen, whole[: len(seen)])


class _Marked:
    """Record i is (i as an input, i as its label)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.float32([i]), i


def test_random_transforms_draw_from_seed_epoch_and_record():
    def jitter(seen):
        def transform(record, rng):
            seen.append(rng)
            x, y = record
            return (x if rng is None else x + rng.random(), y)

        return transform

    records = Records(_Marked(64), jitter([]))

    def inputs(source, epoch, start=0):
        try:
            return [x for x, _ in source.epoch(epoch, start_image=start)]
        finally:
            source.close()

    one = inputs(StreamedSource(records, 16, seed=1, workers=0), 3)
    two = inputs(StreamedSource(records, 16, seed=1, workers=0), 3, start=32)
    np.testing.assert_array_equal(np.concatenate(one[2:]), np.concatenate(two))
    other = np.concatenate(inputs(StreamedSource(records, 16, 1, workers=0), 4))
    assert not np.array_equal(np.sort(np.concatenate(one), 0), np.sort(other, 0))
    # Its own log: a closed pipeline's threads may still finish reads already under way.
    seen = []
    evaluated = StreamedSource(Records(_Marked(64), jitter(seen)), 16, 1, workers=0,
                               shuffle=False, training=False)  # fmt: skip
    x = np.concatenate(inputs(evaluated, 0))
    np.testing.assert_array_equal(x[:, 0], np.arange(64))  # in order, not jittered
    assert seen and all(rng is None for rng in seen)


def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """A run read by a grain worker process, killed (SIGKILL) after a mid-epoch checkpoint,
    resumed (read by threads): the model and evaluations of a run never stopped."""
    straight = source_run(tmp_path / "straight", workers=0)
    folder = tmp_path / "killed"
    env = dict(os.environ, XLA_FLAGS=subprocess_xla_flags(2), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))  # fmt: skip
    log = tmp_path / "child.stderr"
    with open(log, "w") as err:
        child = subprocess.Popen([sys.executable, str(HERE / "_source_child.py"), str(folder)],
                                 env=env, stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            steps = runfolder.checkpoint_steps(folder)
            if steps and (folder / runfolder.DIGESTS / f"{steps[-1]}.json").exists():
                break
            assert child.poll() is None, log.read_text()
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    saved = runfolder.checkpoint_steps(folder)
    assert saved and saved[-1] < 24 and saved[-1] % 8, (saved, log.read_text())  # mid-epoch
    resumed = source_run(folder, workers=0, resume=True)
    assert resumed.steps == 24
    for a, b in zip(leaves(straight), leaves(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    tests = [(r["step"], r["test_loss"]) for r in straight.history if "test_loss" in r]
    assert tests == [(r["step"], r["test_loss"]) for r in resumed.history if "test_loss" in r]


class _Broken(BlobSource):
    def __init__(self, fault):
        train, _ = blob_sources()
        super().__init__(train.x.copy(), train.y.copy())
        self.fault = fault

    def __getitem__(self, i):
        record = super().__getitem__(i)
        if self.fault == "nan" and i == 85:
            record["x"] = np.full_like(record["x"], np.nan)
        if self.fault == "shape" and i == 85:
            record["x"] = record["x"][:3]
        if self.fault == "keys":
            record["image"] = record["x"]
        return record


@pytest.mark.parametrize(
    ("make", "options", "message"),
    [
        (lambda: _Broken("nan"), {}, "train inputs record 85 holds NaN or infinity"),
        (lambda: _Broken("shape"), {}, r"record 85 has input shape \(3,\) but record 0 has \(8,\)"),
        (lambda: _Broken("keys"), {}, r"2 of the input keys .* transform=lambda r"),
        (lambda: BlobSource(np.zeros((0, 8), np.float32), np.zeros(0, int)), {}, "is empty"),
        (lambda: blob_sources()[0], {"data_placement": "device",
                                    "transform": lambda r, rng: r}, "transform is random"),
    ],
    ids=["nan", "shape", "keys", "empty", "random-on-device"],
)
def test_bad_sources_are_refused_naming_the_record(make, options, message):
    with pytest.raises(ConfigError, match=message):
        crossbow_jax.train(MLP(), make(), **{**FAST, **options})


def test_sources_refuse_what_cannot_take_effect():
    train, test = blob_sources()
    with pytest.raises(ConfigError, match="transform= applies to the records of a data source"):
        crossbow_jax.train(MLP(), (train.x, train.y), transform=lambda r: r, **FAST)
    with pytest.raises(ConfigError, match="pass the training data as a source too"):
        crossbow_jax.train(MLP(), (train.x, train.y), test, **FAST)
    undeclared = grain.MapDataset.source(train)
    with pytest.raises(ConfigError, match="give the source a num_classes attribute"):
        crossbow_jax.train("lenet", undeclared, **FAST)


def test_a_record_that_cannot_be_read_is_named():
    class Columns(BlobSource):  # indexes like a table of columns: [i] is not record i
        def __getitem__(self, key):
            return {"x": self.x, "label": self.y}[key]

    train, _ = blob_sources()
    with pytest.raises(ConfigError, match=r"reading record 0 of the Columns failed \(KeyError"):
        crossbow_jax.train(MLP(), Columns(train.x, train.y), **FAST)
