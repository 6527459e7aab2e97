"""The paper's tuner: learners per device chosen while training, from real steps.

`OnlineTuner` is what `crossbow_jax.train(..., learners_per_device="auto")`
hands to the engine's loop (`crossbow_jax.engine.loop.fit`, `tune_mode="online"`,
the default). The run starts training at once with 1 learner per device; after
every interval at a setting the tuner reads that interval's history rows,
measures its throughput, and the decision rule (`Search`: linear or doubling)
proposes the next setting. The engine then adds learners (copies of the
central model with a fresh optimiser state) or drops the last ones, between
two real steps, and training goes on. Every step counts toward the epochs and
the time to accuracy; the data position is kept in images, so every epoch is
still one pass over the training set.

An interval is `tune_repeats + 1` windows of at least `tune_steps` steps in
whole dispatches; the first window is a warm-up, and the setting's throughput
is the median of the other windows' images/s. Compilation of a setting happens
before its interval and is reported apart (`compile_seconds`).
"""

from __future__ import annotations

import datetime
import math
import statistics
from collections.abc import Callable
from typing import Any

from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.tuning.measure import is_out_of_memory, program_memory
from crossbow_jax.tuning.search import Search


class OverMemory(RuntimeError):
    """A setting's compiled program needs more than `tune_memory_limit` bytes per device."""


def windows_throughput(samples: list[tuple[int, float]], windows: int) -> float | None:
    """The median images/s over `windows` equal groups of (images, seconds) samples, the
    first group (a warm-up) left out when there is more than one."""
    samples = [s for s in samples if s[1] > 0]
    if not samples:
        return None
    size = max(1, len(samples) // windows)
    groups = [samples[i : i + size] for i in range(0, len(samples), size)]
    timed = groups[1:] or groups
    return statistics.median(sum(i for i, _ in g) / sum(t for _, t in g) for g in timed)


class OnlineTuner:
    """Chooses learners per device during training (the engine's `OnlineTuner` protocol).

    Args:
        config: the run's config (`tune_strategy`, `tune_threshold`,
            `tune_max_learners`, `tune_steps`, `tune_repeats`, `batch_size`).
        devices: devices in the run's mesh.
        num_train: training examples (the largest setting must fit one step).
        platform, device_kind: the device, for the report.
        model: the model's name, for the report.
        log: where a line per measured setting and the decision go (None: silent).

    Raises:
        ConfigError: even 1 learner per device does not fit one step in the
            training set.
    """

    def __init__(
        self,
        config: TrainConfig,
        devices: int,
        num_train: int,
        *,
        platform: str = "",
        device_kind: str = "",
        model: str = "",
        log: Callable[[str], None] | None = None,
    ):
        per_learner = devices * config.batch_size
        self.cap = min(config.tune_max_learners, num_train // per_learner)
        if self.cap < 1:
            raise ConfigError(
                f"one step of 1 learner per device needs {per_learner} images ({devices} "
                f"devices x batch {config.batch_size}) but the training set has {num_train}"
            )
        self.config, self.log = config, log or (lambda line: None)
        self.search = Search(config.tune_strategy, config.tune_threshold, self.cap)
        self.curve: list[dict[str, Any]] = []
        self.since: int | None = None  # the step where the setting being measured began
        self.pending: list[list] = []  # its (images, seconds, steps) recorded before a resume
        self.info = {
            "mode": "online",
            "strategy": config.tune_strategy,
            "threshold": config.tune_threshold,
            "max_learners": self.cap,
            "steps": config.tune_steps,
            "repeats": config.tune_repeats,
            "devices": devices,
            "platform": platform,
            "device_kind": device_kind,
            "batch_size": config.batch_size,
            "algorithm": config.algorithm,
            "execution": config.execution,
            "model": model,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }

    @property
    def deciding(self) -> bool:
        return not self.search.done

    def first(self) -> int:
        return self.search.propose()

    def until(self, step: int, steps_per_dispatch: int) -> int:
        per_window = math.ceil(self.config.tune_steps / steps_per_dispatch) * steps_per_dispatch
        interval = per_window * (self.config.tune_repeats + 1)
        if self.since is not None and self.since + interval <= step and self.pending:
            return step  # resumed at the interval's end: observe what it recorded
        if self.since is None or self.since + interval <= step:  # (re)starts here
            self.since, self.pending = step, []
        return self.since + interval

    def record(self, samples: list[tuple[int, float, int]]) -> None:
        """The current interval's samples so far (kept in checkpoints)."""
        self.pending = [list(s) for s in samples]

    def admit(self, learners: int, program: Any) -> None:
        limit = self.config.tune_memory_limit
        need = program_memory(program) if limit is not None else None
        if need is not None and need > limit:
            raise OverMemory(f"estimated {need} bytes per device, over tune_memory_limit={limit}")

    def observe(
        self, learners: int, samples: list[tuple[int, float, int]], compile_seconds: float
    ) -> int:
        samples = [tuple(s) for s in self.pending] + list(samples)  # from before a resume
        self.pending = []
        measured = windows_throughput([(i, t) for i, t, _ in samples], self.config.tune_repeats + 1)
        self.curve.append(
            {
                "learners": learners,
                "images_per_second": measured,
                "status": "ok",
                "steps": sum(n for _, _, n in samples),
                "compile_seconds": compile_seconds,
                "error": None,
            }
        )
        previous = next((r["images_per_second"] for r in reversed(self.curve[:-1])
                         if r["images_per_second"]), None)  # fmt: skip
        gain = f" ({measured / previous - 1:+.1%})" if measured and previous else ""
        rate = f"{measured:,.0f} images/s" if measured else "no figure"
        self.log(f"online tuner: {learners} learner(s) per device: {rate}{gain}, "
                 f"{self.curve[-1]['steps']} steps, compiled in {compile_seconds:.1f} s")  # fmt: skip
        self.search.record(measured)
        self.since = None
        return self._next(learners)

    def failed(self, learners: int, error: BaseException) -> int | None:
        over = isinstance(error, OverMemory)
        if not (over or is_out_of_memory(error)) or self.search.propose() != learners:
            return None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        self.curve.append(
            {"learners": learners, "images_per_second": None, "steps": 0,
             "status": "memory" if over else "oom", "compile_seconds": None, "error": first}
        )  # fmt: skip
        self.log(f"online tuner: {learners} learner(s) per device do not fit ({first})")
        self.since = None
        self.search.record(None)
        return self._next(learners)

    def _next(self, learners: int) -> int:
        proposed = self.search.propose()
        if proposed is not None:
            return proposed
        if self.search.chosen is not None:
            self.log(f"online tuner: chose {self.search.chosen} learner(s) per device")
        if self.search.chosen is None:
            raise ConfigError(
                "even 1 learner per device does not fit; use a smaller batch_size or model"
            )
        return self.search.chosen

    def report(self) -> dict[str, Any]:
        return {
            **self.info,
            "chosen": self.search.chosen,
            "deciding": self.deciding,
            "since": self.since if self.deciding else None,
            "pending": self.pending if self.deciding else [],
            "curve": [dict(r) for r in self.curve],
            "tuning_steps": sum(r["steps"] for r in self.curve),
            "compile_seconds": sum(r["compile_seconds"] or 0.0 for r in self.curve),
        }

    def replay(self, report: dict[str, Any]) -> int:
        # The rule as the run was started with it (tune_* may differ on resume).
        self.search = Search(report["strategy"], report["threshold"], report["max_learners"])
        self.info.update({k: report[k] for k in ("strategy", "threshold", "max_learners")})
        for row in report.get("curve", []):
            self.curve.append(dict(row))
            self.search.record(row["images_per_second"])
        self.since, self.pending = report.get("since"), list(report.get("pending", []))
        proposed = self.search.propose()
        return proposed if proposed is not None else self.search.chosen
