"""SIGTERM and SIGINT during a run: finish the dispatch in flight, save, stop.

What a cluster sends before it preempts a job (SIGTERM) and Ctrl-C (SIGINT)
no longer end the process where it stands. `Signals` notes the signal; the
loop finishes the dispatch in flight, writes a checkpoint of that step and
raises `RunInterrupted`, which the command turns into one line and exit code
128 + the signal's number (143, 130). A second SIGINT stops at once
(`KeyboardInterrupt`). With several processes, `poll` lets every process
know when any one of them was signalled, so that all save the same step (the
role of JAX's `reached_preemption_sync_point`, for both signals and without
the preemption service).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import jax

from crossbow_jax.engine import distributed


class RunInterrupted(KeyboardInterrupt):
    """The run stopped on a signal, after saving a checkpoint of `step` (when it has a
    run folder). A `KeyboardInterrupt`, so that `except Exception` does not swallow it; a
    script that wants the shell's exit code ends with `sys.exit(error.exit_code)`.

    Attributes:
        signal: the signal's name ("SIGTERM", "SIGINT").
        step: the step the run reached, and saved when `folder` is set.
        folder: the run folder that holds the checkpoint (None: nothing saved).
        exit_code: 128 + the signal's number, what a shell reports for it.
    """

    def __init__(self, signum: int, step: int, folder: str | None, overwrite: bool = False):
        self.signal, self.step, self.folder = signal.Signals(signum).name, step, folder
        self.exit_code, self._args = 128 + signum, (signum, step, folder, overwrite)
        if folder:
            instead = " in place of --overwrite" if overwrite else ""
            text = (f"{self.signal}: saved step {step} in {folder}; run the same command with "
                    f"--resume{instead} (resume=True) to continue")  # fmt: skip
        else:
            text = f"{self.signal} at step {step}; nothing saved (no run folder, or no step yet)"
        super().__init__(text)

    def __reduce__(self):  # across processes (a pool's worker) as it was raised
        return type(self), self._args


class Signals:
    """Notes SIGTERM and SIGINT while a run is under way (a context manager).

    Handlers are installed only in the main thread (elsewhere Python delivers
    no signals; a run in another thread keeps the process's handlers), not
    for a signal the process ignores (a shell's `cmd &` ignores SIGINT), and
    the previous ones are put back on exit.
    """

    CAUGHT = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received, self._previous = 0, {}

    def __enter__(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.CAUGHT:
                if signal.getsignal(signum) is not signal.SIG_IGN:  # (`nohup`, `cmd &`)
                    self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:  # None: a handler set from C, which Python cannot restore
                signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if not self.received:
            self.received = signum
            name = signal.Signals(signum).name
            again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
            line = (f"crossbow_jax: {name} received: finishing the dispatch in flight, then "
                    f"saving (with a run folder) and stopping{again}\n")  # fmt: skip
            with contextlib.suppress(OSError):  # os.write: print may be mid-call (reentrant)
                os.write(sys.stderr.fileno(), line.encode())


class Interrupt:
    """What the loop calls when a signal came (the one all processes agreed on): save the
    step (once, and not the step the run began at), raise `RunInterrupted`."""

    def __init__(self, signals: Signals, save, checkpointer, first: int, config):
        self.signals, self.save, self.checkpointer = signals, save, checkpointer
        self.first, self.overwrite = first, config.overwrite  # the step this process began at

    def __call__(self, signum: int, step: int, state) -> None:
        saved = self.checkpointer.latest_step() if self.checkpointer else None
        if self.checkpointer and step not in (saved, self.first):  # (not trained: no save,
            self.save(step, state)  # which would also carry out an overwrite for nothing)
            saved = step
        folder = self.checkpointer.directory if saved is not None else None
        raise RunInterrupted(signum, step if saved is None else saved, folder, self.overwrite)


def stop_if_signalled(signals: Signals, step: int | None, folder: str | None) -> None:
    """Between the phases before training (data, measuring, tuning): raises `RunInterrupted`
    when a signal came (every process alike); `step` is the run folder's checkpoint, if any."""
    signum = poll(signals, False)[0]
    if signum:
        raise RunInterrupted(signum, step or 0, folder if step is not None else None)


def poll(signals: Signals | None, timer_due: bool) -> tuple[int, bool]:
    """(signal to stop on or 0, whether a timed checkpoint is due), the same in every process.

    One tiny all-gather per call when there are several processes (none otherwise):
    the largest signal number wins, so a SIGTERM anywhere makes every process exit 143.
    """
    received = signals.received if signals else 0
    if jax.process_count() == 1:  # (every dispatch asks: nothing to gather)
        return received, timer_due
    both = distributed.gather([received, timer_due])
    return int(both[:, 0].max()), bool(both[:, 1].max())
