"""What a run shows and records as it goes: history rows, callbacks, progress output."""

import io

import jax
import numpy as np
from _engine_fixtures import MLP, split

import crossbow_jax
from crossbow_jax.engine import progress
from crossbow_jax.engine.programs import Compiler

TRAIN, TEST = split()
RUN = dict(batch_size=8, learners_per_device=2, num_devices=2, steps_per_dispatch=2)


def test_the_callback_sees_every_row_once_with_its_test_figures():
    rows = []
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=1, eval_every=6, progress=False,
                           callback=rows.append, **RUN)  # fmt: skip
    assert [row["step"] for row in rows] == [row["step"] for row in r.history]
    assert rows == r.history
    assert [row["step"] for row in rows if "test_accuracy" in row] == [6, 12, 18, 24]


def test_images_per_second_leaves_out_evaluations_even_when_dispatch_is_synchronous(
    monkeypatch,
):
    compile_train = Compiler.train_program

    def synchronous(self, *args, **kwargs):  # a device call that returns only once done
        program = compile_train(self, *args, **kwargs)
        return lambda *a: jax.block_until_ready(program(*a))

    monkeypatch.setattr(Compiler, "train_program", synchronous)
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2, eval_every=6, progress=False, **RUN)
    rates = np.array([row["images_per_second"] for row in r.history])
    evaluated = np.array(["test_accuracy" in row for row in r.history])
    typical = np.median(rates[~evaluated])
    assert np.all(rates[evaluated] < 3 * typical), (rates[evaluated], typical)
    assert r.images_per_second < 3 * typical


def test_without_a_terminal_progress_is_a_few_plain_lines(capsys, monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_EVERY", 3600.0)
    r = crossbow_jax.train(MLP(), TRAIN, TEST, epochs=2, progress=True, **RUN)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sma x2dev: step 48/48 (100%)")
    assert "test_acc" in lines[0]
    # the progress's images/s is the run's so far: at the end, the result's own figure
    assert f"img/s {r.images_per_second:.0f} |" in lines[0]


def test_plain_progress_writes_at_most_one_line_per_interval():
    out = io.StringIO()
    bar = progress.PlainProgress(100, 0, "run", every=0.0, stream=out)
    bar.update(10, {"loss": "1.0"})
    bar.every = 3600.0
    for step in range(11, 100):
        bar.update(step, {"loss": "0.5"})
    bar.close()
    assert out.getvalue().splitlines() == ["run: step 10/100 (10%) | loss 1.0",
                                           "run: step 99/100 (99%) | loss 0.5"]  # fmt: skip
