"""Any model the engine trains, behind one small interface.

Three kinds of model are accepted (`as_model`):

- a `flax.linen.Module`: initialised by the engine from the run's seed; its
  train/eval mode is a keyword of `__call__`: `train`, `training`,
  `is_training`, or `deterministic` (inverted), or any other named by
  `mode_keyword` ("name", or "not name" for a keyword that is True in
  evaluation). BatchNorm statistics live in its `batch_stats` collection.
- a `flax.nnx.Module`: already initialised (its parameters are the starting
  point of every learner); split into parameters, other state (BatchNorm
  statistics) and RNG state with `nnx.split`, switched between modes with
  `.train()` / `.eval()` (and, when its `__call__` takes one, the mode
  keyword as for Linen); dropout keys come from the engine, per learner
  and step.
- a pair `(apply_fn, params)`: `apply_fn(params, x) -> outputs`, a pure
  function with no state and no mode.

Each adapter gives `init(key, x) -> (params, state)`,
`apply(params, state, x, train=..., key=...) -> (outputs, state)` and
`variables(params, state)` (the form `TrainResult.params` takes).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

MODE_KEYWORDS = (("train", False), ("training", False), ("is_training", False),
                 ("deterministic", True))  # fmt: skip
"""Recognised train/eval keywords of a Linen `__call__`, and whether each is inverted."""


class ModelError(ValueError):
    """A model the engine cannot train as given (raised before any training)."""


def parse_mode_keyword(text: str) -> tuple[str, bool]:
    """"name" -> (name, False); "not name" -> (name, True: the keyword is True in evaluation)."""
    inverted = text.startswith("not ")
    name = text[4:].strip() if inverted else text.strip()
    if not name.isidentifier():
        raise ModelError(
            f"mode_keyword={text!r} must be a keyword name, or 'not NAME' for one that is "
            "True in evaluation (like deterministic)"
        )
    return name, inverted


@dataclasses.dataclass(frozen=True, eq=False)
class LinenModel:
    """A `flax.linen.Module`, its mode keyword resolved.

    Attributes:
        module: the module.
        mode: (keyword, inverted), or None when `__call__` takes no mode keyword.
        registry: its name in `crossbow_jax.models` when it was chosen by name.
    """

    module: nn.Module
    mode: tuple[str, bool] | None
    registry: str | None = None
    given = False  # the engine initialises the parameters

    @property
    def name(self) -> str:
        return type(self.module).__name__

    def init(self, key, x):
        variables = self.module.init({"params": key, "dropout": key}, x, **_mode(self.mode, False))
        return variables["params"], variables.get("batch_stats", {})

    def apply(self, params, state, x, *, train: bool, key=None):
        variables = {"params": params}
        if state:
            variables["batch_stats"] = state
        if train:
            rngs = {"dropout": key} if key is not None else {}
            outputs, mutated = self.module.apply(
                variables, x, mutable=["batch_stats"], rngs=rngs, **_mode(self.mode, True)
            )
            return outputs, mutated.get("batch_stats", {})
        return self.module.apply(variables, x, **_mode(self.mode, False)), state

    def variables(self, params, state) -> dict[str, Any]:
        return {"params": params, "batch_stats": state} if state else {"params": params}

    def stateful_layers(self, x) -> list[str]:
        """Names of the layers whose behaviour depends on the mode (Dropout, BatchNorm)."""
        found = []

        def spy(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dropout | nn.BatchNorm):
                found.append(type(context.module).__name__)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(spy):
            jax.eval_shape(self.init, jax.random.PRNGKey(0), x)
        return sorted(set(found))


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel:
    """A `flax.nnx.Module`, split into its graph, parameters, RNG state and other state."""

    graphdef: Any
    params: Any  # nnx.State of the nnx.Param variables
    rngs: Any  # nnx.State of the RNG streams (re-keyed every step)
    state: Any  # nnx.State of everything else (BatchNorm statistics, ...)
    name: str = "nnx.Module"
    mode: tuple[str, bool] | None = None  # a mode keyword of __call__, as for Linen
    given = True  # the module arrives initialised

    @staticmethod
    def of(module: nnx.Module, mode_keyword: str | None = None) -> NNXModel:
        graphdef, params, rngs, state = nnx.split(module, nnx.Param, nnx.RngState, ...)
        mode = _call_mode(module, mode_keyword)
        return NNXModel(graphdef, params, rngs, state, type(module).__name__, mode)

    def init(self, key, x):
        return self.params, self.state

    def _keyed_rngs(self, key):
        """Every RNG stream re-keyed from `key` (counts from 0), so each learner and step
        draws its own dropout masks; the streams as they were when `key` is None."""
        leaves, tree = jax.tree.flatten(self.rngs)
        if key is None:  # fresh variables of this trace, with the streams' values
            return jax.tree.unflatten(tree, leaves)
        out = []
        for i, leaf in enumerate(leaves):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):  # any shape (split streams)
                base = jax.random.fold_in(jax.random.wrap_key_data(key), i)
                out.append(jax.random.split(base, max(leaf.size, 1)).reshape(leaf.shape))
            else:
                out.append(jax.numpy.zeros_like(leaf))
        return jax.tree.unflatten(tree, out)

    def apply(self, params, state, x, *, train: bool, key=None):
        # Fresh variables of the current trace: NNX refuses to update a variable made
        # in another one (a closed-over state inside `jax.grad`, say).
        params, state = jax.tree.map(lambda a: a, (params, state))
        module = nnx.merge(self.graphdef, params, self._keyed_rngs(key), state)
        if train:
            module.train()
        else:
            module.eval()
        outputs = module(x, **_mode(self.mode, train))
        if not train:
            return outputs, state
        *_, new_state = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return outputs, new_state

    def variables(self, params, state) -> Any:
        return nnx.merge_state(params, state) if len(state) else params


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionModel:
    """A pure function and its parameters: `apply_fn(params, x) -> outputs`."""

    apply_fn: Callable[[Any, Any], Any]
    params: Any
    name: str = "function"
    given = True

    def init(self, key, x):
        return self.params, {}

    def apply(self, params, state, x, *, train: bool, key=None):
        return self.apply_fn(params, x), state

    def variables(self, params, state) -> Any:
        return params


Model = LinenModel | NNXModel | FunctionModel


def as_model(model: Any, *, mode_keyword: str | None = None) -> Model:
    """The adapter of a Linen module, an NNX module or an `(apply_fn, params)` pair.

    Raises:
        ModelError: anything else, or a `mode_keyword` the model does not take.
    """
    if isinstance(model, LinenModel | NNXModel | FunctionModel):
        return model
    if isinstance(model, type) and issubclass(model, nn.Module | nnx.Module):
        raise ModelError(f"model is the class {model.__name__}; pass an instance, e.g. "
                         f"{model.__name__}(...)")  # fmt: skip
    if isinstance(model, nn.Module):
        return LinenModel(model, _call_mode(model, mode_keyword))
    if isinstance(model, nnx.Module):
        return NNXModel.of(model, mode_keyword)
    if mode_keyword is not None:
        raise ModelError(
            f"mode_keyword={mode_keyword!r} applies to Linen and NNX modules; "
            f"a {type(model).__name__} has no modes"
        )
    if isinstance(model, tuple | list) and len(model) == 2 and callable(model[0]):
        return _function_model(*model)
    raise ModelError(
        f"model must be a flax.linen.Module, a flax.nnx.Module, a pair (apply_fn, params) "
        f"or a model name, got {type(model).__name__}"
    )


def _function_model(apply_fn, params) -> FunctionModel:
    owner = getattr(apply_fn, "__self__", None)
    if isinstance(apply_fn, nn.Module) or isinstance(owner, nn.Module):
        raise ModelError(
            "model is a pair (Linen module or its apply, variables); pass the module alone: the "
            "engine initialises it and keeps its BatchNorm statistics and modes"
        )
    params = jax.tree.map(jax.numpy.asarray, params)
    return FunctionModel(apply_fn, params, getattr(apply_fn, "__name__", "function"))


def _mode(mode: tuple[str, bool] | None, train: bool) -> dict[str, bool]:
    """The mode keyword's value for training or evaluation ({} without one)."""
    if mode is None:
        return {}
    keyword, inverted = mode
    return {keyword: train != inverted}


def _call_mode(module: Any, mode_keyword: str | None) -> tuple[str, bool] | None:
    """The mode keyword of a module's `__call__`: the one named, else a recognised one."""
    parameters = inspect.signature(type(module).__call__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if mode_keyword is not None:
        name, inverted = parse_mode_keyword(mode_keyword)
        if name not in parameters and not takes_any:
            raise ModelError(
                f"mode_keyword={mode_keyword!r} but {type(module).__name__}.__call__ takes no "
                f"{name!r} (it takes {', '.join(p for p in parameters if p != 'self')})"
            )
        return name, inverted
    for name, inverted in MODE_KEYWORDS:
        if name in parameters:
            return name, inverted
    return None


def import_model(path: str) -> Any:
    """The model named by "package.module:attribute" (a model, or a class or function of
    no arguments that returns one), for the shell's `--model`.

    Raises:
        ModelError: the module or attribute cannot be had, or building it fails.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ModelError(f"--model {path!r} must be a model name or package.module:attribute")
    try:
        found = importlib.import_module(module_name)
    except ImportError as e:
        raise ModelError(
            f"cannot import {module_name!r} for --model {path} ({e}); is its folder on "
            "PYTHONPATH?"
        ) from None
    for name in attribute.split("."):
        if not hasattr(found, name):
            raise ModelError(f"{module_name} has no {attribute!r} (from --model {path})")
        found = getattr(found, name)
    if isinstance(found, nn.Module | nnx.Module | tuple | list) or not callable(found):
        return found
    try:
        return found()
    except Exception as e:  # noqa: BLE001 -- the user's factory failed
        raise ModelError(f"calling {path}() to build the model failed: {e}") from None
