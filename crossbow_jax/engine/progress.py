"""How a run shows its progress: a widget in Jupyter, a bar on a terminal, else plain lines.

- In a Jupyter kernel with ipywidgets: `tqdm.auto`'s widget.
- On a terminal (stderr is a TTY): a `tqdm` bar.
- Anywhere else (a log file, CI, a notebook without ipywidgets): one plain
  line on stderr at most every `PLAIN_EVERY` seconds, and one at the end;
  no carriage-return redraws.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

PLAIN_EVERY = 10.0  # seconds between plain progress lines


def in_notebook() -> bool:
    """Whether this runs in a Jupyter (IPython) kernel."""
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    ip = get() if get else None
    return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _has_widgets() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


class PlainProgress:
    """Progress as plain lines, at most one every `every` seconds (and one at the end)."""

    def __init__(
        self,
        total: int,
        initial: int,
        desc: str,
        *,
        every: float | None = None,
        stream: TextIO | None = None,
    ):
        self.total, self.n, self.desc = total, initial, desc
        self.every = PLAIN_EVERY if every is None else every
        self.stream = stream or sys.stderr
        self.postfix: dict[str, Any] = {}
        self.last = time.monotonic()

    def update(self, step: int, postfix: dict[str, Any]) -> None:
        self.n, self.postfix = step, postfix
        if time.monotonic() - self.last >= self.every:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        parts = [f"{self.desc}: step {self.n}/{self.total} ({self.n / self.total:.0%})"]
        parts += [f"{k} {v}" for k, v in self.postfix.items()]
        print(" | ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        self._line()


class BarProgress:
    """A `tqdm` bar (the `tqdm.auto` widget in a notebook)."""

    def __init__(self, total: int, initial: int, desc: str, *, notebook: bool):
        if notebook:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, desc=desc)

    @property
    def total(self) -> int:
        return self.bar.total

    @total.setter
    def total(self, value: int) -> None:
        self.bar.total = value

    def update(self, step: int, postfix: dict[str, Any]) -> None:
        self.bar.n = step
        self.bar.set_postfix(postfix, refresh=True)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, initial: int, desc: str) -> PlainProgress | BarProgress:
    """The progress display that suits where this process runs (see the module docstring)."""
    notebook = in_notebook()
    terminal = getattr(sys.stderr, "isatty", lambda: False)()
    if (notebook and _has_widgets()) or (not notebook and terminal):
        return BarProgress(total, initial, desc, notebook=notebook)
    return PlainProgress(total, initial, desc)
