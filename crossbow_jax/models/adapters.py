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
  and step. A `__call__` that takes `rngs` (a parameter so named or annotated
  `nnx.Rngs`, as in Flax's NNX MNIST tutorial) gets a fresh `nnx.Rngs` in
  training and `rngs=None` in evaluation.
- a pair `(apply_fn, params)`: `apply_fn(params, x) -> outputs`, a pure
  function with no state and no mode.

Each adapter gives `init(key, x) -> (params, state)`,
`apply(params, state, x, train=..., key=...) -> (outputs, state)` and
`variables(params, state)` (the form `TrainResult.params` takes). A `__call__`
that requires a parameter beyond the input which the engine does not pass is
refused (`ModelError`), naming `mode_keyword=` for a train/eval flag.
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

    def call_text(self, train: bool) -> str:
        """How the engine calls the module in a mode (for error messages)."""
        mode = "".join(f", {k}={v}" for k, v in _mode(self.mode, train).items())
        extra = ", rngs={'dropout': key}, mutable=['batch_stats']" if train else ""
        return f"apply(variables, x{mode}{extra})"

    def fixed_layers(self, x) -> list[str]:
        """Names of the Dropout and BatchNorm layers that the engine's training and
        evaluation calls leave in one mode (`deterministic` / `use_running_average` alike
        in both): a mode that cannot take effect."""
        flags: dict[bool, dict] = {True: {}, False: {}}
        training: list[bool] = []  # the mode of the call being traced; empty in init

        def spy(next_fun, args, kwargs, context):
            layer = context.module
            if training and isinstance(layer, nn.Dropout | nn.BatchNorm):
                name = "deterministic" if isinstance(layer, nn.Dropout) else "use_running_average"
                given = kwargs.get(name, args[1] if len(args) > 1 else None)
                flag = getattr(layer, name) if given is None else given
                flags[training[-1]][(type(layer).__name__, layer.scope.path)] = flag
            return next_fun(*args, **kwargs)

        def both(key, x):
            params, state = self.init(key, x)
            for train in (True, False):
                training.append(train)
                try:  # the flags seen up to a failure count (a Dropout fixed on, wanting a key)
                    self.apply(params, state, x, train=train, key=key if train else None)
                except Exception:  # noqa: BLE001, S110 -- `_run_model` reports the failure
                    pass

        with nn.intercept_methods(spy):
            jax.eval_shape(both, jax.random.PRNGKey(0), x)
        return sorted({kind for (kind, path), flag in flags[True].items()
                       if flags[False].get((kind, path)) == flag})  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel:
    """A `flax.nnx.Module`, split into its graph, parameters, RNG state and other state."""

    graphdef: Any
    params: Any  # nnx.State of the nnx.Param variables
    rngs: Any  # nnx.State of the RNG streams (re-keyed every step)
    state: Any  # nnx.State of everything else (BatchNorm statistics, ...)
    name: str = "nnx.Module"
    mode: tuple[str, bool] | None = None  # a mode keyword of __call__, as for Linen
    call_rngs: str | None = None  # the parameter of __call__ that takes call-time nnx.Rngs
    given = True  # the module arrives initialised

    @staticmethod
    def of(module: nnx.Module, mode_keyword: str | None = None) -> NNXModel:
        graphdef, params, rngs, state = nnx.split(module, nnx.Param, nnx.RngState, ...)
        mode, call_rngs = _call_form(module, mode_keyword, nnx_rngs=True)
        return NNXModel(graphdef, params, rngs, state, type(module).__name__, mode, call_rngs)

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
        outputs = module(x, **self._keywords(train, key))
        if not train:
            return outputs, state
        *_, new_state = nnx.split(module, nnx.Param, nnx.RngState, ...)
        return outputs, new_state

    def _keywords(self, train: bool, key) -> dict[str, Any]:
        """The mode keyword, and the call-time rngs: a fresh `nnx.Rngs(key)` (one 'default'
        stream, which serves every stream name) in training, None in evaluation."""
        keywords: dict[str, Any] = _mode(self.mode, train)
        if self.call_rngs is not None:
            fresh = train and key is not None
            keywords[self.call_rngs] = nnx.Rngs(key) if fresh else None
        return keywords

    def call_text(self, train: bool) -> str:
        """How the engine calls the module in a mode (for error messages)."""
        keywords = self._keywords(train, None)
        if self.call_rngs is not None and train:
            keywords[self.call_rngs] = "nnx.Rngs(key)"
        given = "".join(f", {k}={v}" for k, v in keywords.items())
        return f"model.{'train' if train else 'eval'}(); model(x{given})"

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

    def call_text(self, train: bool) -> str:
        return "apply_fn(params, x)"

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
        return LinenModel(model, _call_form(model, mode_keyword, nnx_rngs=False)[0])
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


def _call_form(module: Any, mode_keyword: str | None, *, nnx_rngs: bool):
    """(the mode keyword of a module's `__call__`: the one named, else a recognised one;
    for NNX, the parameter that takes call-time `nnx.Rngs`, or None).

    Raises:
        ModelError: a named keyword it does not take, or a parameter it requires beyond
            the input that the engine does not pass.
    """
    cls = type(module).__name__
    parameters = dict(list(inspect.signature(type(module).__call__).parameters.items())[1:])
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    mode = None
    if mode_keyword is not None:
        mode = parse_mode_keyword(mode_keyword)
        if mode[0] not in parameters and not takes_any:
            raise ModelError(f"mode_keyword={mode_keyword!r} but {cls}.__call__ takes no "
                             f"{mode[0]!r} (it takes {', '.join(parameters)})")  # fmt: skip
    else:
        mode = next(((n, inv) for n, inv in MODE_KEYWORDS if n in parameters), None)
    rngs = None
    if nnx_rngs:
        rngs = next((n for n, p in list(parameters.items())[1:]
                     if n == "rngs" or "Rngs" in str(p.annotation)), None)  # fmt: skip
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    passed = {name for name in (mode and mode[0], rngs) if name}
    for name, p in list(parameters.items())[1:]:
        if p.default is p.empty and p.kind not in variadic and name not in passed:
            raise ModelError(
                f"{cls}.__call__ requires {name!r}, which the engine does not pass (it passes "
                f"the input{', its mode keyword' if mode else ''}{', rngs' if rngs else ''}); "
                f"if {name!r} is the train/eval flag pass mode_keyword={name!r} (or 'not "
                f"{name}' if it is True in evaluation), else give it a default"
            )
    return mode, rngs


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
