"""Orbax checkpoints of the whole training state; the run's identity checked on resume.

A checkpoint holds the global training state (sharded arrays, written by
every process for its own shards) and a small JSON record (step, history,
elapsed time). Orbax writes each step into a temporary folder and renames it
when complete, so a run killed mid-write leaves the previous checkpoint
intact. `config.json` pins what a resumed run must share: the settings, the
layout and the fingerprints of `identity` (model, optimiser state and
behaviour, data); it is written by the first save, so a refused or failed
run leaves the folder as it was. Saves are checked and digested, and a
resume starts from the newest intact checkpoint (`runfolder`).
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

from crossbow_jax.engine import distributed, identity, runfolder
from crossbow_jax.engine.config import ELASTIC_FIELDS, ConfigError, TrainConfig

CONFIG_FILE = runfolder.CONFIG_FILE


class Checkpointer:
    """Saves and restores a run's state in `directory`, holding the folder (`RunLock`).

    Opening it checks the folder before any work: a fresh run into a folder
    that holds another run is refused (unless `config.overwrite`); a resumed
    run must share the saved settings and starts from the newest intact
    checkpoint (a damaged or unfinished newer one is reported in one line and
    set aside in `damaged/`).
    """

    def __init__(self, directory: str, config: TrainConfig, keep: int = 2):
        self.directory, self._keep = os.path.abspath(directory), keep
        self._lock = self._manager = None
        self._pending = self._damaged = None  # what the first save commits
        try:  # every process's checks, then all go on or none (`distributed.agree`)
            distributed.agree(lambda: self._open_folder(config), f"opening {self.directory}")
            if self.saved and jax.process_count() > 1:  # process 0's choice for all
                self.step = int(distributed.gather([self.step or 0])[0, 0])
                self._record = self._record or record_at(self.directory, self.step)
        except BaseException:
            self.close()
            raise

    def _open_folder(self, config: TrainConfig) -> None:
        runfolder.check_writable(self.directory)
        if jax.process_index() == 0:
            self._lock = runfolder.RunLock(self.directory)
        held = runfolder.holds_a_run(self.directory)
        self.overwrite = config.overwrite and held
        self.identity = config.identity()
        self.saved = self._check_identity(config, held)
        self.step, self._record = self._choose_step() if self.saved else (None, None)
        try:
            self._manager = self._open(self._keep)
        except Exception as e:
            raise runfolder.CheckpointError(
                f"cannot open the checkpoints in {self.directory} ({runfolder.cause(e)}); use another folder"
            ) from e

    def _open(self, keep: int) -> ocp.CheckpointManager:
        with _quiet_orbax():  # (its notes on the cut-off checkpoints it cleans up)
            return ocp.CheckpointManager(
                os.path.join(self.directory, runfolder.CHECKPOINTS),
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, create=True, enable_async_checkpointing=False
                ),  # a save is waited for anyway; in the caller's thread, it never outlives it
            )

    def _check_identity(self, config: TrainConfig, held: bool) -> dict[str, Any]:
        """The saved `config.json` of a run to resume ({} for a fresh run, `held` False: the
        folder holds no run); checks the settings."""
        if self.overwrite or not held:
            return {}
        path = os.path.join(self.directory, CONFIG_FILE)
        steps = runfolder.checkpoint_steps(self.directory)
        if not config.resume:
            held = f"checkpoints up to step {steps[-1]}" if steps else "an unfinished checkpoint"
            go_on = ("pass resume=True (--resume) to continue it, " if os.path.exists(path)
                     else "")  # fmt: skip
            raise ConfigError(
                f"{self.directory} already holds a run ({held}); {go_on}pass overwrite=True "
                "(--overwrite) to replace it, or use another folder"
            )
        if not steps:
            return {}  # only a checkpoint that was cut off: the run starts from the beginning
        if not os.path.exists(path):
            raise ConfigError(
                f"{self.directory} holds checkpoints but no {CONFIG_FILE}, so what they belong "
                "to cannot be checked; pass overwrite=True (--overwrite) to start anew, or use "
                "another folder"
            )
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{path} cannot be read ({runfolder.cause(e)}); restore it, or start anew with "
                "overwrite=True (--overwrite)"
            ) from None
        settings, now = identity.saved_settings(saved), self.identity
        keys = set(settings) | set(now)
        diff = sorted(k for k in keys if settings.get(k) != now.get(k))
        if config.elastic:
            diff = [k for k in diff if k not in ELASTIC_FIELDS]
        if diff:
            changes = ", ".join(f"{k}: {settings.get(k)!r} -> {now.get(k)!r}" for k in diff)
            hardware = all(k in ELASTIC_FIELDS for k in diff)
            hint = ", or elastic=True (--elastic) to resume on other hardware" if hardware else ""
            raise ConfigError(
                f"cannot resume {self.directory} with another config ({changes}); "
                f"use the original settings{hint}, or a new folder"
            )
        return saved

    def _choose_step(self) -> tuple[int | None, dict[str, Any] | None]:
        """The newest intact checkpoint and its record (process 0 chooses; the others
        learn its choice once every process has opened the folder). Damaged newer ones
        are reported now and set aside by the first save, once the run passed its checks."""
        if jax.process_index() != 0:
            return None, None
        step, record, damaged = newest_intact(self.directory)
        for bad, problem in damaged:
            runfolder.report(
                f"the checkpoint of step {bad} in {self.directory} is damaged ({problem}); "
                f"resuming from step {step}, the newest intact one"
            )
        if not damaged:
            runfolder.report(f"resuming {self.directory} from step {step}")
        self._damaged = [bad for bad, _ in damaged]
        return step, record

    def check_and_record(self, unchecked: tuple[str, ...] = (), *, data=None,
                         behaviour=identity.DEFAULT, **parts: Any) -> None:  # fmt: skip
        """Checks a resumed run against the run folder, then writes `config.json`
        (settings and fingerprints).

        Args:
            unchecked: parts recorded but not checked (`layout` on an elastic resume).
            data: `identity.data_fingerprint` of the run's data.
            behaviour: `identity.optimizer_behaviour` of an optimiser of the user's
                (`identity.DEFAULT`: the engine's, which the settings pin).
            **parts: `layout=` {"devices", "learners_per_device"}, `model=` the
                parameter tree, `optimizer=` the optimiser state (arrays or shape
                structs; see `identity.FINGERPRINTS`).

        Raises:
            ConfigError: the run folder was started with another model, optimiser or
                data (saying what differs); nothing in the folder is changed.
        """
        record = {**self.identity, runfolder.DIGESTS_KEPT: True}  # a missing digest is damage
        for part, tree in parts.items():
            key, now = f"fingerprint_{part}", identity.fingerprint(tree)
            saved = self.saved.get(key)
            if part == "optimizer" and saved is not None:  # folders that kept its shapes
                saved = {k: v.split("[")[0] + "[]" for k, v in saved.items()}
            if saved is not None and saved != now and part not in unchecked:
                what = identity.describe_difference(saved, now)
                self._refuse(f"{identity.FINGERPRINTS[part]} differs from the one the run was "
                             f"started with ({what})")  # fmt: skip
            record[key] = now
        for part, now in (("data", data), ("behaviour", behaviour)):
            key = f"fingerprint_{part}"
            if key in self.saved:  # (folders from before these were kept: not checked)
                saved = self.saved[key]
                why = identity.data_difference(saved, now) if part == "data" else (
                    identity.behaviour_difference(saved, now))  # fmt: skip
                if why:
                    self._refuse(why)
            record[key] = now
        self._pending = record  # written by the first save: a run that fails before
        # writing anything leaves the folder as it was (an overwritten run included)

    def _commit(self) -> None:
        """Before the first save: the older run goes (overwrite), damaged checkpoints are
        set aside, and `config.json` is written (atomically: others may be reading it)."""
        if self.overwrite:
            self._manager.close()

        def prepare_folder() -> None:  # process 0's part; every process waits for it
            if jax.process_index() != 0:
                return
            if self.overwrite:
                runfolder.clear(self.directory)
            for bad in self._damaged or ():
                where = runfolder.set_aside(self.directory, bad)
                runfolder.report(f"moved the damaged checkpoint of step {bad} to {where}")
            runfolder.write_json(os.path.join(self.directory, CONFIG_FILE), self._pending)

        distributed.agree(prepare_folder, f"preparing {self.directory}")
        if self.overwrite or self._damaged:
            self._manager.close()
            self._manager = self._open(self._keep)
        self.overwrite, self._damaged, self._pending = False, None, None

    def _refuse(self, why: str) -> None:
        raise ConfigError(
            f"cannot resume {self.directory}: {why}; use the original one or a new folder"
        )

    def latest_step(self) -> int | None:
        """The step a resumed run starts from: the newest intact checkpoint (None: none)."""
        return self.step

    def save(self, step: int, state: Any, record: dict[str, Any], central: Any = None) -> None:
        """Writes `state` (jax arrays), a JSON `record` and, when given, the central
        model's `(params, model state)` (NumPy; what `read_central` returns), then the
        checkpoint's digest; returns once all is on disk.

        Raises:
            CheckpointError: orbax declined the save (a step at or below one in the
                folder) or it failed (no space, read-only, permission), naming the cause.
        """
        items = {"state": ocp.args.StandardSave(state), "record": ocp.args.JsonSave(record)}
        if central is not None:
            items["central"] = ocp.args.StandardSave(central)
        where = f"the checkpoint of step {step} in {self.directory}"

        def write() -> bool:
            if self._pending is not None:
                self._commit()
            done = self._manager.save(step, args=ocp.args.Composite(**items))
            if done and jax.process_index() == 0:
                runfolder.write_digest(self.directory, step)
            return done

        try:
            done = distributed.agree(write, f"writing {where}")
        except ConfigError:
            raise
        except Exception as e:
            raise runfolder.CheckpointError(
                f"could not write {where}: {runfolder.cause(e)}; make room or make it writable, then "
                "resume=True (--resume) goes on from the checkpoint before"
            ) from e
        if not done:
            raise runfolder.CheckpointError(
                f"orbax declined to write {where}: the folder already holds step "
                f"{self._manager.latest_step()} (another run wrote there?); use a new folder"
            )
        self.step, self._record = step, record

    def restore(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the chosen checkpoint (`latest_step`) onto the shardings of `like`."""
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like
        )
        args = ocp.args.Composite(state=ocp.args.StandardRestore(target))
        return self._read(args)["state"], self._record

    def latest_record(self) -> dict[str, Any]:
        """The JSON record of the chosen checkpoint (step, position, history, ...)."""
        return self._record

    def _read(self, args) -> Any:
        try:
            with _quiet_orbax():
                return self._manager.restore(self.step, args=args)
        except Exception as e:  # verified files that do not load: not a user's mistake
            raise runfolder.CheckpointError(
                f"the checkpoint of step {self.step} in {self.directory} cannot be read "
                f"({runfolder.cause(e)})"
            ) from e

    def restore_as_saved(self, like: Any) -> Any:
        """The latest checkpoint's state as NumPy arrays of the shapes they were saved with.

        Args:
            like: a state of the same structure (its shapes may differ: another
                number of devices or learners).
        """
        folder = os.path.join(self.directory, runfolder.CHECKPOINTS, str(self.step), "state")
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
        return self._read(ocp.args.Composite(state=ocp.args.StandardRestore(target_tree)))["state"]

    def close(self) -> None:
        if getattr(self, "_manager", None) is not None:
            self._manager.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _no_checkpoint(directory: str) -> ConfigError:
    return ConfigError(f"{directory!r} holds no checkpoint; pass a run folder (checkpoint_dir)")


def _manager(directory: str) -> ocp.CheckpointManager:
    folder = os.path.join(os.path.abspath(directory), runfolder.CHECKPOINTS)
    if not runfolder.checkpoint_steps(directory):
        raise _no_checkpoint(directory)
    with _quiet_orbax():  # it says that a read-only manager saves nothing
        return ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(read_only=True))


def record_at(directory: str, step: int) -> dict[str, Any]:
    """The JSON record of the checkpoint of `step`."""
    with _manager(directory) as manager, _quiet_orbax():
        out = manager.restore(step, args=ocp.args.Composite(record=ocp.args.JsonRestore()))
    return dict(out["record"])


def newest_intact(directory: str) -> tuple[int, dict[str, Any], list[tuple[int, str]]]:
    """The newest checkpoint whose files match their digest and whose record reads, that
    record, and the newer ones that failed (step, what is wrong).

    Raises:
        CheckpointError: no checkpoint is intact (naming what is wrong with each).
    """
    damaged = []
    for step, problem in runfolder.verified(directory):  # newest first, until one is intact
        if problem is None:
            try:
                return step, record_at(directory, step), damaged
            except Exception as e:  # noqa: BLE001 -- a folder without digests, as older
                problem = f"its record cannot be read: {runfolder.cause(e)}"  # versions wrote
        damaged.append((step, problem))
    if not damaged:
        raise _no_checkpoint(directory)
    problems = "; ".join(f"step {step}: {why}" for step, why in damaged)
    raise runfolder.CheckpointError(
        f"no intact checkpoint in {directory} ({problems}); start anew with overwrite=True "
        "(--overwrite) or use another folder"
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
    """The JSON record of a run folder's newest intact checkpoint (step, history, run
    summary); a damaged newer one is reported in one line and skipped."""
    step, record, damaged = newest_intact(directory)
    for bad, problem in damaged:
        runfolder.report(f"skipped the checkpoint of step {bad} in {directory}: damaged "
                         f"({problem}); read step {step}")  # fmt: skip
    return record


def read_central(directory: str, like: Any = None, step: int | None = None) -> Any:
    """A checkpoint's central model `(params, model state)`, without the training state.

    Args:
        directory: a run folder (`checkpoint_dir`).
        like: the central model's `(params, model state)` to restore into
            (arrays or shape structs); None: as saved (nested dicts and lists).
        step: the checkpoint (`read_record(directory)["step"]`); None: the newest intact.

    Raises:
        ConfigError: no checkpoint in the folder, or one without a central model.
    """
    step = newest_intact(directory)[0] if step is None else step
    with _manager(directory) as manager, _quiet_orbax():
        if "central" not in manager.item_metadata(step):
            raise ConfigError(
                f"the checkpoint of step {step} in {directory!r} has no central model (written "
                "by an older crossbow_jax); resume the run to write one"
            )
        if like is not None:
            like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), like)
        out = manager.restore(step, args=ocp.args.Composite(central=ocp.args.StandardRestore(like)))
    return out["central"]
