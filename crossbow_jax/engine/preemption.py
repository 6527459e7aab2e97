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

import signal
import sys
import threading

import jax
import numpy as np


class RunInterrupted(Exception):
    """The run stopped on a signal, after saving a checkpoint of `step` (when it has a
    run folder).

    Attributes:
        signal: the signal's name ("SIGTERM", "SIGINT").
        step: the step the run reached, and saved when `folder` is set.
        folder: the run folder that holds the checkpoint (None: nothing saved).
        exit_code: 128 + the signal's number, what a shell reports for it.
    """

    def __init__(self, signum: int, step: int, folder: str | None):
        self.signal, self.step, self.folder = signal.Signals(signum).name, step, folder
        self.exit_code = 128 + signum
        if folder:
            text = (f"{self.signal}: saved step {step} in {folder}; run the same command with "
                    "--resume (resume=True) to continue")  # fmt: skip
        else:
            text = f"{self.signal} at step {step}; no run folder, nothing saved"
        super().__init__(text)


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
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        if not self.received:
            self.received = signum
            name = signal.Signals(signum).name
            print(f"crossbow_jax: {name} received: finishing the dispatch in flight, then "
                  "saving (Ctrl-C again stops at once)", file=sys.stderr, flush=True)  # fmt: skip


def poll(signals: Signals | None, timer_due: bool) -> tuple[int, bool]:
    """(signal to stop on or 0, whether a timed checkpoint is due), the same in every process.

    One tiny all-gather per call when there are several processes (none otherwise):
    the largest signal number wins, so a SIGTERM anywhere makes every process exit 143.
    """
    received = signals.received if signals else 0
    if jax.process_count() == 1:
        return received, timer_due
    from jax.experimental import multihost_utils

    both = multihost_utils.process_allgather(np.asarray([received, int(timer_due)], np.int32))
    both = np.asarray(both).reshape(-1, 2)
    return int(both[:, 0].max()), bool(both[:, 1].max())
