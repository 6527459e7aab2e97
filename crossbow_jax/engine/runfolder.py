"""The run folder as a whole: one run at a time (a lock), checkpoints that prove
they are intact (digests), and a clean start over an older run (overwrite).

A run folder holds `config.json` (what a resumed run must share),
`checkpoints/<step>/` (orbax), `digests/<step>.json` (a SHA-256 of every
file of that checkpoint, written once orbax has committed it), TensorBoard
event files (`crossbow_jax.engine.events`), and `.lock` while a run holds
the folder. A checkpoint without its digest was cut off
between orbax's commit and the digest (or written by crossbow_jax before
digests), and one whose files no longer match is damaged: resume and
`load_run` skip both for the newest intact step.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from typing import Any

from crossbow_jax.engine.config import ConfigError

LOCK_FILE = ".lock"
DIGESTS = "digests"
DAMAGED = "damaged"
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
DIGESTS_KEPT = "checkpoint_digests"
"""`config.json` key: the run keeps digests, so a checkpoint without one is damaged."""
RUN_FILES = (CONFIG_FILE, "result.json", "history.json", "tuning.json")
"""Files a run writes at the folder's top level (removed, with its checkpoints, by overwrite)."""
EVENTS = "events.out.tfevents."
"""How TensorBoard event files begin (`crossbow_jax.engine.events`; removed by overwrite)."""
WRITING: set[str] = set()
"""Name endings of the event files this process is writing (which overwrite keeps)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read back intact (one line: the folder, the
    step, the cause and what to do); the command prints it as one `error:` line."""


def checkpoint_steps(folder: str) -> list[int]:
    """The committed orbax steps in a run folder, oldest first (temporary folders left out)."""
    path = os.path.join(folder, CHECKPOINTS)
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


def holds_a_run(folder: str) -> bool:
    """Whether `folder` holds another run's checkpoints (committed or half written)."""
    path = os.path.join(folder, CHECKPOINTS)
    return os.path.isdir(path) and any(
        name.isdigit() or ".orbax-checkpoint-tmp" in name for name in os.listdir(path)
    )


def clear(folder: str) -> None:
    """Removes an older run from `folder`: its checkpoints first, then its files (a folder
    that is cut off half way holds no checkpoint, so it is never resumed as a mix)."""
    for name in (CHECKPOINTS, DIGESTS, DAMAGED):
        if os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name))
    events = [name for name in os.listdir(folder)
              if name.startswith(EVENTS) and not name.endswith(tuple(WRITING))]  # fmt: skip
    for name in (*RUN_FILES, *events):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))


# --- the lock -------------------------------------------------------------------------


_HELD: dict[str, list] = {}  # folder -> [file descriptor, holds] of this process's locks


class RunLock:
    """An advisory lock on a run folder, held while a run uses it (a context manager).

    `flock` on `<folder>/.lock` (opened without following a symlink), which the
    kernel releases when the holder dies: a lock left by a dead process is
    taken over. The file names the holder (host, pid, start time) for the
    message another process gets. Re-entrant within a process (the command
    holds the folder around `train`, which holds it too).

    Raises:
        ConfigError: another live process holds the folder (naming it).
    """

    def __init__(self, folder: str):
        self.folder = os.path.realpath(folder)
        self.path = path = os.path.join(self.folder, LOCK_FILE)
        if self.folder in _HELD:
            _HELD[self.folder][1] += 1
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # nothing held open
            # for writing: a file system with such a file cannot be remounted read-only
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise ConfigError(
                f"cannot lock {folder!r}: {path} cannot be opened ({why}); remove it, or use "
                "another folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "holder unknown"
            os.close(fd)
            raise ConfigError(
                f"{folder!r} is in use by another run ({holder}); wait for it to end, or use "
                "another folder"
            ) from None
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self._write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}")  # a dead
        _HELD[self.folder] = [fd, 1]  # holder's line goes: its lock went with it

    def _write(self, holder: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.write(fd, holder.encode())
        finally:
            os.close(fd)

    def release(self) -> None:
        """Lets the folder go (the file stays: removing it would race with a new holder)."""
        held = _HELD.get(self.folder)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.folder]
            with contextlib.suppress(OSError):  # a folder gone read-only keeps the line
                self._write("")
            os.close(held[0])  # releases the flock

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# --- digests ----------------------------------------------------------------------------


def _files(step_folder: str) -> dict[str, str]:
    """Every file under a checkpoint's folder: relative path -> "size:sha256"."""
    out = {}
    for root, dirs, names in os.walk(step_folder):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            out[os.path.relpath(path, step_folder)] = (
                f"{os.path.getsize(path)}:{digest.hexdigest()}"
            )
    return out


def write_digest(folder: str, step: int) -> None:
    """Records the digest of a committed checkpoint (atomically), and drops the digests of
    checkpoints orbax has since removed."""
    digests = os.path.join(folder, DIGESTS)
    os.makedirs(digests, exist_ok=True)
    files = _files(os.path.join(folder, CHECKPOINTS, str(step)))
    write_json(os.path.join(digests, f"{step}.json"), {"step": step, "files": files})
    kept = {str(s) for s in checkpoint_steps(folder)}
    for name in os.listdir(digests):
        if name.endswith(".json") and name[:-5] not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(digests, name))


def write_json(path: str, value: Any, **dump: Any) -> None:
    """Writes `value` as JSON all at once: a reader sees the old file or the new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True, **dump)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def more(items: list) -> str:
    """ " (and N more)" after the first of `items` ("" for one)."""
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def damage(folder: str, step: int) -> str | None:
    """What is wrong with a checkpoint's files against its digest, or None when intact."""
    path = os.path.join(folder, DIGESTS, f"{step}.json")
    try:
        with open(path) as f:
            saved = json.load(f)["files"]
    except FileNotFoundError:
        return "it has no digest: cut off before it was complete, or the digest was deleted"
    except (ValueError, KeyError):
        return f"its digest {path} is unreadable"
    try:
        now = _files(os.path.join(folder, CHECKPOINTS, str(step)))
    except OSError as e:
        return f"its files cannot be read ({e.strerror})"
    missing = sorted(set(saved) - set(now))
    if missing:
        return f"{missing[0]} is missing{more(missing)}"
    changed = sorted(k for k in saved if saved[k] != now[k])
    sizes = [(k, now[k].split(":")[0], saved[k].split(":")[0]) for k in changed]
    resized = [(k, n, was) for k, n, was in sizes if n != was]
    if resized:
        k, n, was = resized[0]
        return f"{k} has {n} of its {was} bytes{more(resized)}"
    if changed:
        return f"{changed[0]} has changed since it was written{more(changed)}"
    return None


def verified(folder: str):
    """Yields the folder's checkpoints newest first, each with what is wrong with it (None:
    intact); stop at the first intact one, older ones are not read.

    A folder without any digest (written before crossbow_jax kept them) is
    taken as it is. Otherwise a step is intact when its files match its digest.
    """
    digests = os.path.join(folder, DIGESTS)
    checked = os.path.isdir(digests) and any(n.endswith(".json") for n in os.listdir(digests))
    checked = checked or _config(folder).get(DIGESTS_KEPT, False)  # (every digest deleted)
    for step in checkpoint_steps(folder)[::-1]:
        yield step, damage(folder, step) if checked else None


def _config(folder: str) -> dict[str, Any]:
    try:
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def newest_intact_step(folder: str) -> int | None:
    """The newest checkpoint whose files match their digest (None: none)."""
    return next((step for step, problem in verified(folder) if problem is None), None)


def set_aside(folder: str, step: int) -> str:
    """Moves a damaged checkpoint out of orbax's way (into `damaged/`); returns where."""
    target = os.path.join(folder, DAMAGED, str(step))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.exists(target):  # one set aside before keeps its place
        target += time.strftime("-%Y%m%d-%H%M%S")
    os.replace(os.path.join(folder, CHECKPOINTS, str(step)), target)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, DIGESTS, f"{step}.json"))
    return target


def report(line: str) -> None:
    """One line on stderr (process 0's): what the run folder did on its own."""
    print(f"crossbow_jax: {line}", file=sys.stderr, flush=True)


def cause(error: BaseException) -> str:
    """An exception in a few words: an OS error's reason, else its first line."""
    while error.__cause__ is not None and not isinstance(error, OSError):
        error = error.__cause__
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) < 300 else text[:297] + "..."


def check_writable(folder: str) -> None:
    """Fails early, with the path, when a run folder cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(
            f"cannot write to {folder!r} ({e.strerror}); pick a folder you can write"
        ) from None
