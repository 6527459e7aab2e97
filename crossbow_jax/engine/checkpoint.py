"""Orbax checkpoints of the whole training state, and the run's identity.

A checkpoint holds the global training state (sharded arrays, written by
every process for its own shards) and a small JSON record (step, history,
elapsed time). Orbax writes each step into a temporary folder and renames it
when complete, so a run killed mid-write leaves the previous checkpoint
intact. `config.json` in the run folder pins the settings a resumed run must
share.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from crossbow_jax.engine.config import ConfigError, TrainConfig, check_writable

CONFIG_FILE = "config.json"


class Checkpointer:
    """Saves and restores a run's state in `directory`."""

    def __init__(self, directory: str, config: TrainConfig, keep: int = 2):
        self.directory = os.path.abspath(directory)
        check_writable(self.directory)
        self._manager = ocp.CheckpointManager(
            os.path.join(self.directory, "checkpoints"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )
        self._check_identity(config)

    def _check_identity(self, config: TrainConfig) -> None:
        path = os.path.join(self.directory, CONFIG_FILE)
        identity = config.identity()
        if os.path.exists(path) and self.latest_step() is not None:
            with open(path) as f:
                saved = json.load(f)
            if not config.resume:
                raise ConfigError(
                    f"{self.directory} already holds a run; pass resume=True "
                    "(--resume) to continue it, or use another folder"
                )
            diff = sorted(k for k in set(saved) | set(identity) if saved.get(k) != identity.get(k))
            if diff:
                changes = ", ".join(f"{k}: {saved.get(k)!r} -> {identity.get(k)!r}" for k in diff)
                raise ConfigError(
                    f"cannot resume {self.directory} with another config ({changes}); "
                    "use the original settings or a new folder"
                )
        if jax.process_index() == 0:  # atomic: other processes may be reading it
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(identity, f, indent=1, sort_keys=True)
            os.replace(tmp, path)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, record: dict[str, Any]) -> None:
        """Writes `state` (jax arrays) and a JSON `record`; waits until it is on disk."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
            ),
        )
        self._manager.wait_until_finished()

    def restore(self, like: Any) -> tuple[Any, dict[str, Any]]:
        """Restores the latest checkpoint onto the shardings of `like`."""
        step = self.latest_step()
        target = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), like
        )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["record"])

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
