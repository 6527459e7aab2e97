"""Random-access sources for the streaming tests (test_sources.py, _source_child.py)."""

import crossbow_jax
from _engine_fixtures import MLP, blobs


class BlobSource:
    """Gaussian blobs as a random-access source of {"x": ..., "label": ...} records."""

    num_classes = 4

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "label": self.y[i]}


def blob_sources():
    """(train, test): 256 and 64 records of one blob problem."""
    x, y = blobs(320)
    return BlobSource(x[:256], y[:256]), BlobSource(x[256:], y[256:])


RUN = dict(
    batch_size=8, learners_per_device=2, num_devices=2, epochs=3, steps_per_dispatch=1,
    checkpoint_every=3, eval_every=4, execution="unroll", progress=False, seed=3,
    data_placement="host",
)  # fmt: skip
"""8 steps an epoch (256 records, 32 a step), 24 in all, a checkpoint every 3 steps."""


def source_run(folder, workers, callback=None, resume=False):
    """The streamed blob run in `folder`, read by `workers` grain processes."""
    train, test = blob_sources()
    return crossbow_jax.train(MLP(), train, test, checkpoint_dir=str(folder), resume=resume,
                              data_workers=workers, callback=callback, **RUN)  # fmt: skip
