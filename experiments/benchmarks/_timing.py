"""Clocks, interleaved repeats and output shared by the benchmark scripts.

Timing practice (docs/performance.md): compile ahead of time and report that
time apart, warm up, wait with `jax.block_until_ready`, and take the median of
repeats. Variants compared with each other are interleaved (A B C, A B C, ...)
within one process, so that load from other programs on a shared machine
falls on all of them alike; only ratios from one run are meaningful there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

DEFAULT_OUT = "results/benchmarks"


def parse_args(doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options every benchmark takes.

    Args:
        doc: the script's module docstring, shown by `--help`.
        argv: arguments (None: `sys.argv`).

    Returns:
        Namespace with `quick` (tiny sizes, a few seconds), `out` (folder of
        the JSON file) and `repeats` (None: the script's default).
    """
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"JSON folder (default {DEFAULT_OUT})")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant")
    return parser.parse_args(argv)


def environment() -> dict[str, Any]:
    """Where and when a measurement was taken: device, versions, date."""
    devices = jax.devices()
    first = devices[0]
    device = f"{first.platform}: {len(devices)} x {first.device_kind}"
    if first.platform == "cpu":
        device += f", {os.cpu_count()} CPU cores"
    return {
        "device": device,
        "platform": first.platform,
        "jax": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def rate(fn: Callable[[], Any], images: int) -> Callable[[], list[float]]:
    """Wraps `fn` (which processes `images` images) into a callable returning [images/s].

    The clock stops only once `fn`'s results are ready (`jax.block_until_ready`).
    """

    def run() -> list[float]:
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return [images / (time.perf_counter() - start)]

    return run


def interleave(
    variants: dict[str, Callable[[], list[float]]], repeats: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Runs `repeats` rounds of all variants in turn (after `warmup` untimed rounds).

    Args:
        variants: name -> callable that does some work and returns one or
            more measured throughputs (images/s, see `rate`).
        repeats: timed rounds.
        warmup: untimed rounds first.

    Returns:
        name -> every throughput it returned, in round order.
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            samples[name].extend(fn())
    return samples


def median(values: Sequence[float]) -> float:
    """The median (the figure every benchmark reports)."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy the repeats were (0 for one value)."""
    mid = median(values)
    return float((max(values) - min(values)) / mid) if mid else 0.0


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of `columns` from `rows` (floats to 3 significant digits)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def write_rows(
    out: str, name: str, rows: list[dict[str, Any]], env: dict[str, Any], quick: bool
) -> pathlib.Path:
    """Writes `rows`, each stamped with `env` and the benchmark's name, as JSON.

    Quick runs go to `NAME-quick.json` so that they never replace a full run.

    Returns:
        The path written.
    """
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{'-quick' if quick else ''}.json"
    stamped = [{"benchmark": name, "quick": quick, **env, **row} for row in rows]
    path.write_text(json.dumps(stamped, indent=1) + "\n")
    return path
