"""Choosing the execution while training: the candidates timed on the run's own steps.

`OnlineExecutions` is what `crossbow_jax.train(..., execution="auto")` hands to
the engine's loop (`crossbow_jax.engine.loop.fit`, its `ExecutionChooser`
protocol). With a decision cached for the setting, the run uses it from its
first step. Otherwise it starts at once with the platform's default
(`resolve_execution`: unroll on CPU, vmap elsewhere); after an interval of
real steps (as the online tuner's: `tune_repeats + 1` windows of `tune_steps`,
the first a warm-up) the next candidate is compiled and runs the next real
steps on the same state, and so on; the fastest runs the rest of the run. No
step is thrown away: every step counts toward the epochs.

A candidate is tried only when the run's remaining time (at the fastest speed
measured so far) exceeds `repay` (default `REPAY`) times its compilation:
trying costs about one compilation, and then a candidate that is `1 / repay`
(10%) faster repays it. A short run thus measures nothing beyond its own
steps. The compilation counted is a cold one (programs loaded from JAX's
persistent cache take a fraction of it): each candidate's cold compile time
is kept beside the decisions (`compile-*.json`), and a candidate not yet
compiled cold anywhere is estimated by the longest cold one known. The
decision is written to the execution cache (`crossbow_jax.tuning.executions`)
only when every candidate was measured.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax

from crossbow_jax.engine.config import TrainConfig
from crossbow_jax.engine.programs import resolve_execution
from crossbow_jax.tuning.executions import (
    decision_file,
    default_candidates,
    format_executions,
    share,
    store_decision,
    stored_decision,
)
from crossbow_jax.tuning.online import windows_throughput

REPAY = 10.0


class OnlineExecutions:
    """Chooses the execution during training (the engine's `ExecutionChooser` protocol).

    Args:
        config: the run's config (`tune_steps`, `tune_repeats`, and what the cache key
            holds).
        model, data, mesh: the run's resolved model and data and its mesh (the cache key).
        candidates: executions to choose from (default: `default_candidates()`); the
            platform's default, when among them, runs first.
        repay: try a candidate only while the remaining time exceeds `repay` x the
            longest compilation measured (None: `REPAY`).
        cache_dir: the execution cache (None: `default_cache_dir()`; "": none).
        log: where a line per candidate and the decision go (None: silent).
    """

    def __init__(
        self,
        config: TrainConfig,
        model,
        data,
        mesh,
        *,
        candidates: Sequence[str] | None = None,
        repay: float | None = None,
        cache_dir: str | None = None,
        log: Callable[[str], None] | None = None,
    ):
        names = list(dict.fromkeys(default_candidates() if candidates is None else candidates))
        first = resolve_execution("auto", mesh)
        self.names = sorted(names, key=lambda n: n != first)  # tried in this order
        self.listed = names  # the cache's order (the one `tune`'s trials share)
        self.config, self.model, self.data, self.mesh = config, model, data, mesh
        self.repay = REPAY if repay is None else repay
        self.cache_dir, self.log = cache_dir, log or (lambda line: None)
        self.rows: list[dict[str, Any]] = []  # one per candidate tried, in order
        self.learners = self.key = self.path = self.chosen = self.skipped = None
        self.deciding, self.cached, self.since = False, False, None
        self.remaining, self.per_step = 0, 0.0  # steps left, images per step (last observed)
        self.running = self.names[0]
        self.cold: dict[str, float] = {}  # execution -> its cold compile seconds (known)

    def start(self, learners: int) -> str:
        """The execution to start with at `learners` per device: the cached decision (then
        nothing is measured) or the first candidate."""
        self.learners = learners
        self.key, self.path = decision_file(self.config, self.model, self.data, self.mesh,
                                            learners, self.listed, self.cache_dir)  # fmt: skip
        stored = stored_decision(self.path, self.key, self.listed)
        self.cold = share(self._read_cold() if jax.process_index() == 0 else {})
        if stored:
            self.rows, self.chosen, self.cached = stored["candidates"], stored["chosen"], True
            self.log(f"execution: {self.chosen} (cached in {self.path})")
            self.running = self.chosen
        else:
            self.deciding, self.running = True, self.names[0]
        return self.running

    def until(self, step: int, steps_per_dispatch: int) -> int:
        """The step at which the running candidate's interval (begun at `step`) ends."""
        per_window = math.ceil(self.config.tune_steps / steps_per_dispatch) * steps_per_dispatch
        self.since = step if self.since is None else self.since
        return self.since + per_window * (self.config.tune_repeats + 1)

    def observe(
        self, execution: str, samples: list[tuple[int, float, int]], compile_seconds: float,
        remaining: int, cold: bool = True,
    ) -> str:  # fmt: skip
        """A candidate's (images, seconds, steps) per dispatch, the compile time of its
        dispatch programs (`cold`: none loaded from the compilation cache) and the steps
        left -> the execution to run next."""
        self.since = None
        if cold:
            self.cold[execution] = compile_seconds
            self._write_cold()
        speed = windows_throughput([(i, t) for i, t, _ in samples], self.config.tune_repeats + 1)
        steps = sum(n for _, _, n in samples)
        self.remaining, self.per_step = remaining, sum(i for i, _, _ in samples) / max(steps, 1)
        self.rows.append({"execution": execution, "images_per_second": speed,
                          "compile_seconds": compile_seconds, "steps": steps,
                          "status": "ok" if speed else "error",
                          "error": None if speed else "no throughput measured"})  # fmt: skip
        rate = f"{speed:,.0f} images/s" if speed else "no figure"
        self.log(f"execution {execution}: {rate} over {steps} steps, "
                 f"compiled in {compile_seconds:.1f} s")  # fmt: skip
        return self._next()

    def failed(self, execution: str, error: BaseException) -> str:
        """A candidate could not be compiled: its row, and the execution to run next."""
        lines = str(error).strip().splitlines()
        self.rows.append({"execution": execution, "images_per_second": None,
                          "compile_seconds": None, "steps": 0, "status": "error",
                          "error": f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]})  # fmt: skip
        self.log(f"execution {execution}: failed ({self.rows[-1]['error']})")
        return self._next()

    def _next(self) -> str:
        best = self._best()
        tried = {r["execution"] for r in self.rows}
        untried = [n for n in self.names if n not in tried]
        following = best["execution"]
        if untried:
            left = self.remaining * self.per_step / best["images_per_second"]
            measured = max(r["compile_seconds"] or 0.0 for r in self.rows)
            compiles = self.cold.get(untried[0], max(self.cold.values(), default=measured))
            if left > self.repay * compiles:
                following = untried[0]
            else:
                self.skipped = (f"not measured: {', '.join(untried)} (the run's remaining "
                                f"{left:.1f} s < {self.repay:g} x {compiles:.1f} s compile)")  # fmt: skip
        following = share(following)  # process 0's, so that every process runs the same
        if following not in tried:
            self.running = following
            return following
        self.deciding, self.chosen, self.running = False, following, following
        if not untried:  # every candidate measured: for the next run
            rows = sorted(self.rows, key=lambda r: self.listed.index(r["execution"]))
            record = {"key": self.key, "chosen": following, "candidates": rows}
            self.path = store_decision(self.path, record)
        else:
            self.path = None
        for line in format_executions(self.report()).splitlines():
            self.log(line)
        return following

    def _cold_file(self) -> str | None:
        """Where the cold compile times go: beside the decision, `compile-<digest>.json`."""
        if not self.path:
            return None
        folder, name = os.path.split(self.path)
        return os.path.join(folder, name.replace("execution-", "compile-", 1))

    def _read_cold(self) -> dict[str, float]:
        """The cold compile times known for this setting (process 0's file)."""
        try:
            with open(self._cold_file()) as f:
                stored = json.load(f)
            times = stored["compile_seconds"] if stored["key"] == self.key else {}
            return {k: float(v) for k, v in times.items() if k in self.names}
        except (OSError, TypeError, ValueError, KeyError, AttributeError):
            return {}

    def _write_cold(self) -> None:
        store_decision(self._cold_file(), {"key": self.key, "compile_seconds": self.cold})

    def _best(self) -> dict[str, Any]:
        ok = [r for r in self.rows if r["status"] == "ok"]
        if not ok:  # the first candidate, which ran, gave no figure: it stays
            return {"execution": self.rows[0]["execution"], "images_per_second": math.inf}
        return max(ok, key=lambda r: r["images_per_second"])

    def cost(self) -> float:
        """Seconds the measurement added to the run: the compilations of the candidates not
        chosen, and the time they ran slower than the chosen one."""
        if self.cached or not self.rows or self.chosen is None:
            return 0.0
        chosen = next(r for r in self.rows if r["execution"] == self.chosen)
        extra = 0.0
        for r in self.rows:
            if r is not chosen:
                extra += r["compile_seconds"] or 0.0
                if r["images_per_second"] and chosen["images_per_second"]:
                    images = r["steps"] * self.per_step
                    extra += max(images / r["images_per_second"]
                                 - images / chosen["images_per_second"], 0.0)  # fmt: skip
        return extra

    def report(self) -> dict[str, Any]:
        """The choice so far (`TrainResult.executions`): "mode" ("online"), "chosen" (the
        decision, else the best measured so far, else the running one), "deciding",
        "learners", "candidates" (rows in the order tried: "execution",
        "images_per_second", "compile_seconds", "steps", "status", "error"), "cached",
        "cache_file", "key", "skipped" (why candidates were not measured), "seconds" (what
        measuring cost: `cost`)."""
        chosen = self.chosen or (self._best()["execution"] if self.rows else self.running)
        return {"mode": "online", "chosen": chosen, "deciding": self.deciding,
                "learners": self.learners, "candidates": [dict(r) for r in self.rows],
                "cached": self.cached, "cache_file": self.path, "key": self.key,
                "skipped": self.skipped, "seconds": self.cost()}  # fmt: skip
