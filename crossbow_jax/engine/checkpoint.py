"""Orbax checkpoints of the whole training state, and the run's identity.

A checkpoint holds the global training state (sharded arrays, written by
every process for its own shards) and a small JSON record (step, history,
elapsed time). Orbax writes each step into a temporary folder and renames it
when complete, so a run killed mid-write leaves the previous checkpoint
intact. `config.json` in the run folder pins what a resumed run must share:
the settings (`TrainConfig.identity`), the layout, and fingerprints of the
model's parameter tree (every array's path, dtype and shape) and of the
optimiser state (every array's path and dtype: its shapes follow the layout).
It is written only once a run has passed every check, so a refused resume
leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from crossbow_jax.engine.config import ELASTIC_FIELDS, ConfigError, TrainConfig, check_writable

CONFIG_FILE = "config.json"
FINGERPRINTS = {
    "layout": "the layout (devices x learners per device)",
    "model": "the model",
    "optimizer": "the optimiser",
}
"""Fingerprinted parts of the state: `config.json` key `fingerprint_<part>`, and their names."""


def fingerprint(tree: Any) -> dict[str, str]:
    """Every leaf of `tree` by path: "dtype[shape]" for an array, the value for a number."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {
        jax.tree_util.keystr(path): f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") else repr(x)
        for path, x in leaves
    }


def describe_difference(saved: dict[str, str], now: dict[str, str]) -> str:
    """What differs between two fingerprints, in a few words."""
    changed = [k for k in saved if k in now and saved[k] != now[k]]
    gone = [k for k in saved if k not in now]
    new = [k for k in now if k not in saved]
    parts = []
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        parts.append(f"{changed[0]} was {saved[changed[0]]}, now {now[changed[0]]}{more}")
    for what, keys in (("saved arrays missing now", gone), ("arrays not in the run", new)):
        if keys:
            parts.append(f"{len(keys)} {what} (e.g. {keys[0]})")
    return "; ".join(parts)


class Checkpointer:
    """Saves and restores a run's state in `directory`."""

    def __init__(self, directory: str, config: TrainConfig, keep: int = 2):
        self.directory = os.path.abspath(directory)
        check_writable(self.directory)
        self._manager = ocp.CheckpointManager(
            os.path.join(self.directory, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self.identity = config.identity()
        try:
            self.saved = self._check_identity(config)
        except ConfigError:
            self._manager.close()
            raise

    def _check_identity(self, config: TrainConfig) -> dict[str, Any]:
        """The saved `config.json` of a run to resume ({} for a fresh run); checks the settings."""
        path = os.path.join(self.directory, CONFIG_FILE)
        if not (os.path.exists(path) and self.latest_step() is not None):
            return {}
        with open(path) as f:
            saved = json.load(f)
        if not config.resume:
            raise ConfigError(
                f"{self.directory} already holds a run; pass resume=True "
                "(--resume) to continue it, or use another folder"
            )
        settings = {k: v for k, v in saved.items() if not k.startswith("fingerprint_")}
        identity = self.identity
        keys = set(settings) | set(identity)
        diff = sorted(k for k in keys if settings.get(k) != identity.get(k))
        if config.elastic:
            diff = [k for k in diff if k not in ELASTIC_FIELDS]
        if diff:
            changes = ", ".join(f"{k}: {settings.get(k)!r} -> {identity.get(k)!r}" for k in diff)
            hardware = all(k in ELASTIC_FIELDS for k in diff)
            hint = ", or elastic=True (--elastic) to resume on other hardware" if hardware else ""
            raise ConfigError(
                f"cannot resume {self.directory} with another config ({changes}); "
                f"use the original settings{hint}, or a new folder"
            )
        return saved

    def check_and_record(self, unchecked: tuple[str, ...] = (), **parts: Any) -> None:
        """Checks a resumed run's model and optimiser against the run folder, then writes
        `config.json` (settings and fingerprints).

        Args:
            unchecked: parts recorded but not checked (`layout` on an elastic resume).
            **parts: `layout=` {"devices", "learners_per_device"}, `model=` the
                parameter tree, `optimizer=` the optimiser state (arrays or shape
                structs; see `FINGERPRINTS`).

        Raises:
            ConfigError: the run folder was started with another model or
                optimiser; nothing in the folder is changed.
        """
        record = dict(self.identity)
        for part, tree in parts.items():
            key, now = f"fingerprint_{part}", fingerprint(tree)
            saved = self.saved.get(key)
            if part == "optimizer" and saved is not None:  # folders that kept its shapes
                saved = {k: v.split("[")[0] + "[]" for k, v in saved.items()}
            if saved is not None and saved != now and part not in unchecked:
                raise ConfigError(
                    f"cannot resume {self.directory}: {FINGERPRINTS[part]} differs from the "
                    f"one the run was started with ({describe_difference(saved, now)}); "
                    "use the original one or a new folder"
                )
            record[key] = now
        if jax.process_index() == 0:  # atomic: other processes may be reading it
            path = os.path.join(self.directory, CONFIG_FILE)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, path)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, record: dict[str, Any], central: Any = None) -> None:
        """Writes `state` (jax arrays), a JSON `record` and, when given, the central
        model's `(params, model state)` (NumPy; what `read_central` returns); waits
        until it is on disk."""
        items = {"state": ocp.args.StandardSave(state), "record": ocp.args.JsonSave(record)}
        if central is not None:
            items["central"] = ocp.args.StandardSave(central)
        self._manager.save(step, args=ocp.args.Composite(**items))
        self._manager.wait_until_finished()

    def restore(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the latest checkpoint onto the shardings of `like`."""
        step = self.latest_step()
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like
        )
        with _quiet_orbax():
            out = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()
                ),
            )
        return out["state"], dict(out["record"])

    def latest_record(self) -> dict[str, Any]:
        """The JSON record of the latest checkpoint (step, position, history, ...)."""
        with _quiet_orbax():
            out = self._manager.restore(
                self.latest_step(), args=ocp.args.Composite(record=ocp.args.JsonRestore())
            )
        return dict(out["record"])

    def restore_as_saved(self, like: Any) -> Any:
        """The latest checkpoint's state as NumPy arrays of the shapes they were saved with.

        Args:
            like: a state of the same structure (its shapes may differ: another
                number of devices or learners).
        """
        step = self.latest_step()
        folder = os.path.join(self.directory, "checkpoints", str(step), "state")
        with ocp.StandardCheckpointer() as reader, _quiet_orbax():  # no per-item warnings
            saved = reader.metadata(folder).item_metadata
        saved = getattr(saved, "tree", saved)

        def target(path, leaf):
            node = saved
            for entry in path:
                key = getattr(entry, "name", getattr(entry, "key", getattr(entry, "idx", None)))
                node = node[key] if not isinstance(node, dict) or key in node else node[str(key)]
            return np.zeros(node.shape, node.dtype)

        target_tree = jax.tree_util.tree_map_with_path(target, like)
        with _quiet_orbax():
            out = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target_tree))
            )
        return out["state"]

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _latest(manager, directory: str) -> int:
    step = manager.latest_step()
    if step is None:
        raise ConfigError(f"{directory!r} holds no checkpoint; pass a run folder (checkpoint_dir)")
    return step


def _manager(directory: str) -> ocp.CheckpointManager:
    folder = os.path.join(os.path.abspath(directory), "checkpoints")
    if not os.path.isdir(folder):
        raise ConfigError(f"{directory!r} holds no checkpoint; pass a run folder (checkpoint_dir)")
    return ocp.CheckpointManager(folder)


def check_same_model(directory: str, params: Any) -> None:
    """Refuses a model whose parameter tree (one learner's) is not the run folder's."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        saved = json.load(f).get("fingerprint_model")
    now = fingerprint(params)
    if saved is not None and saved != now:
        raise ConfigError(
            f"the model differs from the one {directory!r} was trained with "
            f"({describe_difference(saved, now)}); pass the run's model"
        )


@contextlib.contextmanager
def _quiet_orbax():
    """Orbax logs a warning for every item of a checkpoint that is not restored."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def read_record(directory: str) -> dict[str, Any]:
    """The JSON record of a run folder's latest checkpoint (step, history, run summary)."""
    with _manager(directory) as manager, _quiet_orbax():
        step = _latest(manager, directory)
        out = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(out["record"])


def read_central(directory: str, like: Any = None) -> tuple[dict[str, Any], Any]:
    """The latest checkpoint's JSON record and central model, without the training state.

    Args:
        directory: a run folder (`checkpoint_dir`).
        like: the central model's `(params, model state)` to restore into
            (arrays or shape structs); None: as saved (nested dicts and lists).

    Raises:
        ConfigError: no checkpoint in the folder, or one without a central model.
    """
    with _manager(directory) as manager, _quiet_orbax():
        step = _latest(manager, directory)
        if "central" not in manager.item_metadata(step):
            raise ConfigError(
                f"the checkpoint of step {step} in {directory!r} has no central model (written "
                "by an older crossbow_jax); resume the run to write one"
            )
        if like is not None:
            like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), like)
        out = manager.restore(
            step,
            args=ocp.args.Composite(
                central=ocp.args.StandardRestore(like), record=ocp.args.JsonRestore()
            ),
        )
    return dict(out["record"]), out["central"]
