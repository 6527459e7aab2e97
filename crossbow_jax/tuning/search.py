"""The decision rule of the auto-tuner, apart from any measurement (no device).

A `Search` proposes a number of learners per device, is told the measured
throughput of that setting (or that it failed), and proposes the next one
until it has decided. `decide` runs a `Search` over a recorded curve, so the
rule can be checked without a device.

Two strategies:

- "linear" (the paper's rule, the default): start at 1 learner; add one while
  the throughput gain over the previous setting exceeds `threshold`; on the
  first setting that does not (or that fails), keep the previous one.
- "doubling": try 1, 2, 4, 8, ... while each step gains more than
  `(1 + threshold) ** added - 1` (the linear rule's threshold compounded over
  the learners added); then, from the last accepted setting, add one learner
  at a time with the linear rule, up to the first rejected setting.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Mapping

from crossbow_jax.engine.config import TUNE_STRATEGIES, TrainConfig, check_field

# How much a throughput may exceed the required value and still not count as a
# gain: it keeps exact equality (a gain of exactly `threshold`) a stop, whatever
# the rounding of `prev * (1 + threshold)`.
_REL_EPS = 1e-9
STRATEGIES = TUNE_STRATEGIES

_Proposals = Generator[int, "float | None", int | None]


def check_options(strategy: str, threshold: float, max_learners: int) -> None:
    """Checks tuning options by the rules of their `TrainConfig` fields.

    Raises:
        ConfigError: (a `ValueError`) with a one-line message.
    """
    check_field("tune_strategy", strategy)
    check_field("tune_threshold", threshold)
    check_field("tune_max_learners", max_learners)


def gains_enough(new: float | None, prev: float, threshold: float, added: int = 1) -> bool:
    """Whether throughput `new` beats `prev` by more than `threshold` per added learner.

    Args:
        new: throughput of the larger setting (None: that setting failed).
        prev: throughput of the smaller setting.
        threshold: the required relative gain for one added learner (0.1 = 10%).
        added: learners per device added between the two settings.

    Returns:
        True when `new > prev * (1 + threshold) ** added` (strictly; equality
        is not a gain).
    """
    if new is None:
        return False
    required = prev * (1.0 + threshold) ** added
    return new > required + _REL_EPS * abs(required)


def _linear(threshold: float, cap: int, start: int = 1, start_value: float | None = None):
    """Proposals of the linear rule; returns the chosen setting (None if `start` failed)."""
    best, value = start, start_value
    if value is None:
        value = yield start
        if value is None:
            return None
    while best < cap:
        new = yield best + 1
        if not gains_enough(new, value, threshold):
            return best
        best, value = best + 1, new
    return best


def _doubling(threshold: float, cap: int):
    """Proposals of the doubling search, refined with linear steps."""
    best = 1
    value = yield 1
    if value is None:
        return None
    while best < cap:
        nxt = min(2 * best, cap)
        new = yield nxt
        if not gains_enough(new, value, threshold, added=nxt - best):
            # Refine: linear steps from `best`, not beyond the rejected setting.
            return (yield from _linear(threshold, nxt - 1, start=best, start_value=value))
        best, value = nxt, new
    return best


class Search:
    """A stepper over settings of learners per device, fed with measured throughputs.

    Example::

        search = Search("linear", threshold=0.1, max_learners=8)
        while (m := search.propose()) is not None:
            search.record(measure(m))   # images/s, or None when m failed
        search.chosen                   # the decision

    The defaults are those of `TrainConfig`'s `tune_*` fields.

    Args:
        strategy: "linear" (default, the paper's rule) or "doubling".
        threshold: the relative throughput gain that justifies one more
            learner per device (0.1 = 10%).
        max_learners: the largest setting ever proposed.
    """

    def __init__(
        self,
        strategy: str = TrainConfig.tune_strategy,
        threshold: float = TrainConfig.tune_threshold,
        max_learners: int = TrainConfig.tune_max_learners,
    ):
        check_options(strategy, threshold, max_learners)
        self.strategy, self.threshold, self.max_learners = strategy, threshold, max_learners
        rule = _linear if strategy == "linear" else _doubling
        self._gen: _Proposals = rule(threshold, max_learners)
        self._pending: int | None = None
        self._results: dict[int, float | None] = {}
        self.done = False
        self.chosen: int | None = None
        self._advance(None, first=True)

    @property
    def results(self) -> dict[int, float | None]:
        """Throughput of every setting recorded so far (None: failed)."""
        return dict(self._results)

    def propose(self) -> int | None:
        """The next setting to measure, or None once the search has decided."""
        return self._pending

    def record(self, images_per_second: float | None) -> None:
        """Records the throughput of the proposed setting (None: it failed, e.g. OOM)."""
        if self._pending is None:
            raise RuntimeError("the search has decided; nothing is waiting for a result")
        if images_per_second is not None and not images_per_second >= 0:
            raise ValueError(f"images_per_second={images_per_second!r} must be >= 0 or None")
        self._results[self._pending] = images_per_second
        self._advance(images_per_second)

    def _advance(self, value: float | None, first: bool = False) -> None:
        try:
            while True:
                m = next(self._gen) if first else self._gen.send(value)
                first = False
                if m not in self._results:  # a setting already measured is not re-run
                    self._pending = m
                    return
                value = self._results[m]
        except StopIteration as stop:
            self._pending, self.done, self.chosen = None, True, stop.value


@dataclasses.dataclass(frozen=True)
class Decision:
    """The outcome of `decide`: the chosen setting and the settings tried, in order."""

    chosen: int | None
    tried: list[int]


def decide(
    curve: Mapping[int, float | None] | Callable[[int], float | None],
    threshold: float = TrainConfig.tune_threshold,
    strategy: str = TrainConfig.tune_strategy,
    max_learners: int = TrainConfig.tune_max_learners,
) -> Decision:
    """Runs the decision rule on a recorded (or simulated) throughput curve.

    Args:
        curve: images/s per learners-per-device setting, as a mapping or a
            function; None (or a missing key) marks a setting that fails,
            e.g. runs out of memory.
        threshold, strategy, max_learners: as for `Search`.

    Returns:
        A `Decision`; `chosen` is None only when even 1 learner fails.

    Example:
        >>> decide({1: 100.0, 2: 150.0, 3: 160.0, 4: 170.0}).chosen
        2
    """
    lookup = curve if callable(curve) else curve.get
    search = Search(strategy, threshold, max_learners)
    tried = []
    while (m := search.propose()) is not None:
        tried.append(m)
        search.record(lookup(m))
    return Decision(search.chosen, tried)
