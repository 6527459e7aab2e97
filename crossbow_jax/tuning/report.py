"""The tuner's outputs: a text table, a JSON file and a PNG plot of the curve."""

from __future__ import annotations

import json
import os
from typing import Any

from crossbow_jax.engine import runfolder

JSON_FILE = "tuning.json"
_COLUMNS = ("learners", "images/s", "gain", "memory", "compile s", "status")
_WIDTHS = (8, 10, 7, 10, 9, 6)


def format_bytes(n: int | None) -> str:
    """`n` bytes in B, KiB, MiB or GiB ('-' for None)."""
    if n is None:
        return "-"
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _cells(row: dict[str, Any], previous: float | None) -> list[str]:
    ips = row.get("images_per_second")
    gain = f"{ips / previous - 1:+.1%}" if ips is not None and previous else "-"
    compile_s = row.get("compile_seconds")
    return [
        str(row["learners"]),
        f"{ips:.1f}" if ips is not None else "-",
        gain,
        format_bytes(row.get("memory_bytes")),
        f"{compile_s:.1f}" if compile_s is not None else "-",
        row["status"],
    ]


def _line(cells: list[str]) -> str:
    return "  ".join(c.rjust(w) for c, w in zip(cells, _WIDTHS))


def table_header() -> str:
    """The header line of the curve table."""
    return _line(list(_COLUMNS))


def table_row(row: dict[str, Any], previous: float | None = None) -> str:
    """One curve row as a table line; `gain` is relative to `previous` images/s."""
    return _line(_cells(row, previous))


def format_table(result: dict[str, Any]) -> str:
    """The whole curve as a text table, the chosen setting marked with `*`.

    The gain column compares each row with the previous successful row, in
    the order the settings were tried.
    """
    lines = [table_header()]
    previous = None
    for row in result["curve"]:
        mark = " *" if row["learners"] == result["chosen"] else ""
        lines.append(table_row(row, previous) + mark)
        if row.get("images_per_second") is not None:
            previous = row["images_per_second"]
    lines.append(summary(result))
    return "\n".join(lines)


def summary(result: dict[str, Any]) -> str:
    """One line: the decision and how it was reached."""
    return (
        f"chosen: {result['chosen']} learner(s) per device ({result['strategy']} search, "
        f"threshold {result['threshold']:.0%}, cap {result['max_learners']}, "
        f"{len(result['curve'])} trials, {result['seconds']:.1f} s)"
    )


def write_json(result: dict[str, Any], path: str | os.PathLike) -> str:
    """Writes the result as JSON (folders created); returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    runfolder.write_json(path, result)
    return path


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a result written by `write_json`."""
    with open(path) as f:
        return json.load(f)


def plot_curve(result: dict[str, Any], path: str | os.PathLike) -> str:
    """Draws throughput against learners per device into a PNG; returns the path.

    Successful trials are joined by a line, failed ones (out of memory or
    over the memory limit) are crosses on the x axis, and the chosen setting
    is ringed. Uses the Agg canvas directly, so the global matplotlib backend
    is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = sorted(result["curve"], key=lambda r: r["learners"])
    ok = [r for r in rows if r.get("images_per_second") is not None]
    failed = [r for r in rows if r.get("images_per_second") is None]
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(
        [r["learners"] for r in ok], [r["images_per_second"] for r in ok], "o-", label="measured"
    )
    if failed:
        ax.plot([r["learners"] for r in failed], [0] * len(failed), "rx", ms=9, label="did not fit")
    chosen = [r for r in ok if r["learners"] == result["chosen"]]
    if chosen:
        ax.plot(
            [chosen[0]["learners"]],
            [chosen[0]["images_per_second"]],
            "o",
            ms=14,
            mfc="none",
            mec="C3",
            mew=2,
            label=f"chosen: {result['chosen']}",
        )
    ax.set_xlabel("learners per device")
    ax.set_ylabel("images/s (all learners)")
    ax.set_ylim(0, 1.12 * max([r["images_per_second"] for r in ok], default=1.0))
    ax.set_xticks(sorted({r["learners"] for r in rows}))
    ax.set_title(
        f"{result.get('model', 'model')}, batch {result.get('batch_size')}, "
        f"{result.get('devices')} {result.get('platform', '')} device(s): "
        f"{result['strategy']}, threshold {result['threshold']:.0%}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    fig.savefig(path)
    return path
