"""Everything checked before any work: the model's mode, its fit to the data, the task, the
optimiser. Each failure is one `ConfigError` line naming the value and the fix.

`check_run` runs the model once abstractly (`jax.eval_shape`, nothing is
computed) on one preprocessed training example to learn its outputs, then
decides the task (classification when the labels are class indices that
the outputs score), checks every label and every float input of both
splits, and the learner optimiser on the model's parameters.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from crossbow_jax.engine import mapping
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.inputs import Arrays
from crossbow_jax.engine.optimizers import check_optimizer
from crossbow_jax.engine.options import one_line
from crossbow_jax.engine.plan import Layout
from crossbow_jax.engine.task import RESERVED, LossFn, MetricsFn, Task
from crossbow_jax.models import get_spec
from crossbow_jax.models.adapters import LinenModel, Model, NNXModel
from crossbow_jax.transformation import fragment_sizes

DEFAULT_LOSS = "the default loss is softmax cross-entropy on integer class labels"


def check_run(
    config: TrainConfig,
    model: Model,
    optimizer: Any,
    data: Arrays,
    *,
    loss_fn: LossFn | None = None,
    metrics_fn: MetricsFn | None = None,
) -> Task:
    """Checks a run before any work; returns its `Task`.

    Raises:
        ConfigError: one line: what is wrong, where (split and row), and the fix.
    """
    pair = np.concatenate([data.example] * 2)  # two examples: per-example shapes show
    sample = data.preprocess(pair, None)
    check_mode(model, sample)  # first: a layer fixed in one mode may fail the runs below
    params, state, outputs = _run_model(model, sample, data)
    check_parameters(params)
    task = _task(config, np.concatenate([data.label_example] * 2), outputs, loss_fn, metrics_fn)
    default = task.classification and loss_fn is None  # labels must index the outputs
    named = getattr(model, "registry", None)
    check_values(data, task, outputs.shape[-1] if default else None, named=named)
    check_optimizer(optimizer, params, model.variables(params, state))
    check_fragments(config, params)
    return task


def check_fragments(config: TrainConfig, params: Any) -> None:
    """DiLoCo's fragments against the model: at most one fragment a layer."""
    if config.algorithm == "diloco" and config.fragments > 1:
        try:
            fragment_sizes(params, config.fragments)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _run_model(model: Model, sample, data: Arrays):
    """The model's abstract parameters, state and outputs on `sample`, both modes tried."""
    where = (f"{model.name} fails on two training examples (shape {data.example.shape[1:]}, "
             f"dtype {data.example.dtype})")  # fmt: skip
    key = jax.random.PRNGKey(0)
    try:
        params, state = _abstract_variables(model, sample)
    except ZeroDivisionError:
        raise _empty_layer(model, where) from None
    except Exception as e:  # noqa: BLE001 -- the user's model failed: say so, with its error
        raise ConfigError(f"{where}: {one_line(e)}") from None
    runs = {}
    for train in (False, True):
        try:
            runs[train] = jax.eval_shape(
                lambda p, s, x, t=train: model.apply(p, s, x, train=t, key=key if t else None),
                params, state, sample,
            )  # fmt: skip
        except ZeroDivisionError:
            raise _empty_layer(model, where) from None
        except Exception as e:  # noqa: BLE001 -- the user's model failed: say so, with its error
            mode = "training" if train else "evaluation"
            raise ConfigError(f"{where}: {one_line(e)} (in {mode}, called as "
                              f"{model.call_text(train)}){_hint(model, e)}") from None  # fmt: skip
    (outputs, _), (_, new_state) = runs[False], runs[True]
    if not isinstance(outputs, jax.ShapeDtypeStruct):
        raise ConfigError(
            f"{model.name} returns a {type(outputs).__name__}; the engine needs one array of "
            "outputs per batch (return the array the loss is computed on)"
        )
    if jax.tree.structure(new_state) != jax.tree.structure(state):
        raise ConfigError(
            f"{model.name} changes the structure of its state in training (variables created "
            "or removed by a call, such as sown intermediates); keep them out of training calls"
        )
    return params, state, outputs


def _empty_layer(model: Model, where: str) -> ConfigError:
    """jax's initialisers divide by a layer's input size, 0 when a convolution or pooling
    leaves nothing: the examples are too small for the model."""
    name = getattr(model, "registry", None)
    built = f" ({name} is built for {get_spec(name).input_shape})" if name else ""
    return ConfigError(
        f"{where}: a layer's input is empty (ZeroDivisionError in its initialiser): the "
        f"examples are too small for the model's convolutions and pooling{built}; pass "
        "larger inputs or pad them"
    )


def check_parameters(params) -> None:
    """Trained parameters are float arrays."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if not jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact):
            raise ConfigError(
                f"the model's parameter {jax.tree_util.keystr(path)} is {leaf.dtype}; "
                "parameters are trained, so they must be float arrays"
            )


def check_mode(model: Model, sample) -> None:
    """A Linen model's Dropout or BatchNorm must differ between training and evaluation (a
    mode keyword, or Dropout keyed on `self.has_rng('dropout')`), or it trains in one mode."""
    if not isinstance(model, LinenModel) or model.mode is not None:
        return
    try:
        layers = model.fixed_layers(sample)
    except Exception:  # noqa: BLE001 -- the model does not run at all: `_run_model` says why
        return
    if layers:
        raise ConfigError(
            f"{model.name} has {' and '.join(layers)} but its __call__ takes none of train, "
            "training, is_training, deterministic, so it would train and evaluate in one "
            "mode; add one (e.g. `def __call__(self, x, train: bool = False)`) and pass it "
            "to the layers, or name yours with mode_keyword="
        )


def _hint(model: Model, error: Exception) -> str:
    """What to change, for a layer left without the rngs it draws."""
    if isinstance(model, NNXModel) and "rngs" in str(error):
        return ("; give the layer rngs where it is built (e.g. nnx.Dropout(rate, rngs=rngs)), or "
                "take `rngs` in __call__ and pass it to the layer")  # fmt: skip
    if isinstance(model, LinenModel) and "needs PRNG" in str(error):
        return "; Linen models get one rng, 'dropout', in training only: draw from it"
    return ""


def _abstract_variables(model: Model, sample):
    if model.given:
        return model.init(None, None)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)


def _task(config, labels: np.ndarray, outputs, loss_fn, metrics_fn) -> Task:
    """The run's task, from two examples' labels and outputs; each user function checked."""
    integer = np.issubdtype(labels.dtype, np.integer)
    scores = outputs.shape[:-1] == labels.shape and outputs.ndim >= 2 and outputs.shape[-1] > 1
    if loss_fn is None and not (integer and scores):
        kind = "integer" if integer else f"{labels.dtype}"
        raise ConfigError(
            f"{DEFAULT_LOSS}, but the outputs have shape {outputs.shape[1:]} per example and "
            f"the labels are {kind} of shape {labels.shape[1:]}; pass loss_fn=(outputs, "
            "labels) -> per-example loss (e.g. a squared error for regression)"
        )
    task = Task(loss_fn, metrics_fn, classification=bool(integer and scores))
    label = jax.ShapeDtypeStruct(labels.shape, labels.dtype)
    for name, fn in (("loss_fn", loss_fn), ("metrics_fn", metrics_fn)):
        if fn is None:
            continue
        try:
            got = jax.eval_shape(fn, outputs, label)
        except Exception as e:  # noqa: BLE001 -- the user's function failed
            raise ConfigError(f"{name} failed on the model's outputs: {one_line(e)}") from None
        values = {"loss": got} if name == "loss_fn" else got
        taken = isinstance(values, dict) and (
            set(values) & set(RESERVED) or any(str(k).startswith("test_") for k in values)
        )
        if name == "metrics_fn" and (not isinstance(values, dict) or taken):
            raise ConfigError(
                "metrics_fn must return a dict {name: per-example values} whose names are not "
                f"{', '.join(RESERVED)} or test_* (the engine's own), got {values!r}"
            )
        for key, value in values.items():
            if not isinstance(value, jax.ShapeDtypeStruct) or value.shape[:1] != (2,):
                shape = getattr(value, "shape", type(value).__name__)
                raise ConfigError(
                    f"{name} must give one value per example, shape (batch, ...), but "
                    f"{key!r} has shape {shape} for a batch of 2"
                )
    if config.target_accuracy is not None and not task.classification:
        raise ConfigError(
            f"target_accuracy={config.target_accuracy} needs a classification task (integer "
            "class labels scored by the model's outputs); this task reports its loss only"
        )
    return task


def check_values(data: Arrays, task: Task, num_outputs: int | None, named: str | None = None):
    """No NaN or infinity in float inputs or labels; class labels in [0, outputs), not 1..C.

    A named model (`named`) scores as many classes as the train labels' largest + 1, so
    train labels running 1..C (0 never used) are refused, and so is a test label beyond.
    """
    for split, x, y, row in _checked_splits(data):
        for part, values in (("inputs", x), ("labels", y)):
            if values is not None and np.issubdtype(values.dtype, np.floating):
                bad = _first_row(~np.isfinite(values))
                if bad is not None:
                    raise ConfigError(
                        f"{split} {part} {row(bad)} holds NaN or infinity; clean or drop that "
                        f"{row(bad).split()[0]} before training"
                    )
        if num_outputs is not None and y is not None:
            _check_zero_based(split, y, num_outputs, named)
            outside = (y < 0) | (y >= num_outputs)
            bad = _first_row(outside)
            if bad is not None:
                value = np.ravel(y[bad])[np.ravel(outside[bad])][0]
                fix = (f"the named model {named!r} scores {num_outputs} classes, the train "
                       "labels' largest + 1: every class needs a train example" if named else
                       f"the model scores {num_outputs} classes; use labels 0..{num_outputs - 1}"
                       " or a model with more outputs")  # fmt: skip
                raise ConfigError(
                    f"{split} labels {row(bad)} holds {value}, outside [0, {num_outputs}): {fix}"
                )


def _checked_splits(data: Arrays):
    """(split, inputs, labels, name of row i) of the arrays held, or of a streamed source's
    sample (its rows named by record index)."""
    for split, x, y, sample in (("train", data.train_x, data.train_y, data.train_sample),
                                ("test", data.test_x, data.test_y, data.test_sample)):  # fmt: skip
        if x is not None:
            yield split, x, y, lambda i: f"row {i}"
        elif sample is not None:
            yield split, sample[0], sample[1], lambda i, rows=sample[2]: f"record {int(rows[i])}"


def _check_zero_based(split: str, y: np.ndarray, num_outputs: int, named: str | None) -> None:
    """Refuses class labels that run 1..C (with C their count of values) where they cannot be
    meant: a named model's train labels (it is sized from them), or C beyond the outputs."""
    sized_by_them = named and split == "train"
    if y.size == 0 or y.min() != 1 or not (sized_by_them or y.max() >= num_outputs):
        return
    top = int(y.max())
    if len(np.unique(y)) == top:
        raise ConfigError(f"{split} labels run 1..{top}; class labels must start at 0: pass y - 1")


def _first_row(mask: np.ndarray) -> int | None:
    rows = np.any(mask.reshape(len(mask), -1), axis=1)
    return int(np.argmax(rows)) if rows.any() else None


def memory_limit(devices) -> tuple[int, int] | None:
    """(bytes, devices sharing them) that this process's `devices` can hold: the smallest
    `bytes_limit` of one device where they report it (GPU, TPU), each device its own; on
    CPU the host's physical memory, shared by every simulated device of the process;
    None where neither is known (not checked)."""
    limits = [mapping.memory_stats(device).get("bytes_limit") for device in devices]
    if limits and all(limits):
        return int(min(limits)), 1
    if limits and all(d.platform == "cpu" for d in devices):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), len(limits)
        except (ValueError, OSError):  # not a POSIX host
            return None
    return None


def resident_bytes(model: Model, tx, data: Arrays, mesh, learners: int, placement: str):
    """What one device must hold for the whole of every dispatch, in bytes, by part.

    The training state of `learners` learners (their parameters; the optimiser state,
    which holds each learner's state and the central model with its own, from
    `tx.init`; the model state): a dispatch takes it donated and updates it in place.
    The training set when device-resident (a copy on every device, with the epoch's
    permutation); the device's share of the test set. Gradients, activations and XLA's
    workspace are left out: XLA may consume a gradient leaf by leaf as it is made, so
    they are not certain to be whole at once. A lower bound: a run that needs more
    cannot fit.
    """
    devices = mesh.size
    sample = jax.eval_shape(data.preprocess, data.example, None)
    params, state = _abstract_variables(model, sample)
    stacked = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct((devices, learners, *np.shape(p)), p.dtype), params
    )
    init = jax.jit(mapping.device_map(tx.init, mesh))
    parts = {
        "parameters": _nbytes(stacked) // devices,
        "optimiser state": _nbytes(jax.eval_shape(init, stacked)) // devices + _nbytes(state),
    }
    if placement == "device" and data.train_x is not None:
        parts["training set"] = data.train_x.nbytes + data.train_y.nbytes + 4 * data.num_train
    if data.test_x is not None:
        row = (data.test_x.nbytes + data.test_y.nbytes) // len(data.test_x)
        parts["test set share"] = -(-len(data.test_x) // devices) * row
    return parts


def check_memory(config: TrainConfig, model: Model, tx, data: Arrays, mesh, layout: Layout,
                 placement: str) -> None:  # fmt: skip
    """Refuses a layout whose resident bytes (`resident_bytes`, a lower bound) exceed what
    the devices hold (`memory_limit`), before anything is placed. With
    learners_per_device="auto" the tuner chooses (and guards its own trials), so 1 learner
    per device is checked: if it cannot fit, no setting can.

    Raises:
        ConfigError: one line with the estimate, its parts, the devices' memory and the fix.
    """
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    limit = memory_limit(local)
    if limit is None:
        return
    auto = config.learners_per_device == "auto"
    learners = 1 if auto else layout.learners
    parts = resident_bytes(model, tx, data, mesh, learners, placement)
    need, (held, sharing) = sum(parts.values()), limit
    if need * sharing <= held:
        return
    who = f"{learners} learners per device need" if learners > 1 else "1 learner per device needs"
    who = f"learners_per_device='auto': even {who}" if auto else who
    detail = ", ".join(f"{name} {_size(n)}" for name, n in parts.items())
    where = (f"a device holds {_size(held)}" if sharing == 1 else
             f"this process's {sharing} {local[0].platform.upper()} devices share the host's "
             f"{_size(held)} ({_size(need * sharing)} together)")  # fmt: skip
    fixes = ["fewer learners per device"] if learners > 1 else []
    fixes.append("a smaller model")
    resident = parts.get("training set", 0)
    if resident and ((need - resident) * sharing <= held or resident == max(parts.values())):
        fixes.append("data_placement='host'")  # the training set is what does not fit
    if sharing > 1 and need <= held:
        fixes.append("fewer devices")
    fix = " or ".join([", ".join(fixes[:-1]), fixes[-1]] if len(fixes) > 1 else fixes)
    raise ConfigError(
        f"{who} at least {_size(need)} on each device ({detail}), but {where}; use {fix}"
    )


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _size(n: int) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"
