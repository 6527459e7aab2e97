"""The rules of the configuration fields: how a field is declared, checked and normalised.

`option(...)` declares a field with its help, group and rule (the metadata
that `crossbow_jax/engine/config.py` and the `crossbow-jax` flags read);
`check_value` checks a value against the rule.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np

GROUPS = (
    "learners and algorithm",
    "learner optimiser (SGD) and schedule",
    "replica averaging (docs/sma.md)",
    "execution",
    "run folder",
    "auto-tuning (docs/tuning.md)",
    "model",
)


class ConfigError(ValueError):
    """A configuration value that cannot work; raised before any training."""


def one_line(error: BaseException, limit: int = 600) -> str:
    """Another error's type and message for a `ConfigError`'s one line: its lines joined
    while they fit `limit` characters (never cut inside a line, except a first line longer
    than `limit`)."""
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    text = lines[0][:limit] if lines else ""
    for line in lines[1:]:
        if len(text) + 1 + len(line) > limit:
            text += " ..."
            break
        text += " " + line
    return f"{type(error).__name__}: {text}"


@dataclasses.dataclass(frozen=True)
class Range:
    """The numbers a field accepts: above `low` (or at it, if `low_in`), below `high`."""

    low: float
    low_in: bool = False
    high: float | None = None
    high_in: bool = False

    def __contains__(self, x: float) -> bool:
        above = x >= self.low if self.low_in else x > self.low
        below = self.high is None or (x <= self.high if self.high_in else x < self.high)
        return above and below

    def __str__(self) -> str:
        if self.low == -math.inf:
            return "a number"
        if self.high is None:
            return f"{'>=' if self.low_in else '>'} {self.low:g}"
        left, right = "[" if self.low_in else "(", "]" if self.high_in else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


POSITIVE = Range(0)
NON_NEGATIVE = Range(0, low_in=True)
UNIT = Range(0, low_in=True, high=1)  # [0, 1)


def option(default: Any, help: str, group: str, **rule: Any) -> Any:
    """A `TrainConfig` field with its help, group and rule.

    Args:
        default: the field's default.
        help: what the field means, one phrase; "(default: ...)" in it
            replaces the generated one.
        group: one of `GROUPS` (how `--help` groups the flags).
        **rule: `choices` (a tuple of strings, or ints); `at_least` (an int field's
            smallest value); `range` (a `Range` for a number); `none` (what
            None means, for an optional field); `auto` (the string "auto" is
            accepted too); `refuse` (a function that raises `ConfigError` for a value
            the generic message would explain badly, checked first); `identity`
            (False: a resumed run may change it); `default_optimizer` (a
            setting of the default learner optimiser, refused together with
            `optimizer=`); and for the shell only:
            `flags`, `metavar`, `cli_default`, `cli_type` (a parser taking the
            flag's text), `cli` (False: no flag, for a setting of Python's
            `train` alone).
    """
    if group not in GROUPS:
        raise ValueError(f"group {group!r} is not one of {GROUPS}")
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **rule})


def kind(field: dataclasses.Field) -> str:
    """A field's kind, from its annotation: "int", "float", "str", "bool" or "tuple"."""
    first = str(field.type).split(" | ")[0]
    return "tuple" if first.startswith("tuple") else first


def check_value(field: dataclasses.Field, value: Any) -> None:
    """Checks a value against a field's rule; raises `ConfigError` naming the field."""
    name, rule, what = field.name, field.metadata, kind(field)
    if value is None and "None" in str(field.type):
        return
    if "refuse" in rule:
        rule["refuse"](value)
    if rule.get("auto") and value == "auto":
        return
    if "choices" in rule:
        if value not in rule["choices"] or (what == "int" and not _is_int(value)):
            choices = ", ".join(map(str, rule["choices"]))
            raise ConfigError(f"{name}={value!r} is not one of {choices}")
    elif what == "int":
        low = rule.get("at_least")
        if not _is_int(value) or (low is not None and value < low):
            bound = "" if low is None else f" >= {low}"
            extra = ' or "auto"' if rule.get("auto") else ""
            raise ConfigError(f"{name}={value!r} must be an int{bound}{extra}")
    elif what == "float":
        if _is_number(value) and not math.isfinite(value):
            raise ConfigError(f"{name}={value!r} must be a finite number")
        numbers = rule.get("range", Range(-math.inf))
        if not _is_number(value) or value not in numbers:
            prefix = "" if _is_number(value) or "range" not in rule else "a number "
            extra = f" (or None for {rule['none']})" if "none" in rule else ""
            raise ConfigError(f"{name}={value!r} must be {prefix}{numbers}{extra}")
    elif what == "bool" and not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be True or False")
    elif what == "str" and not isinstance(value, str):
        raise ConfigError(f"{name}={value!r} must be a string")


def normalise(field: dataclasses.Field, value: Any) -> Any:
    """NumPy scalars as Python ones, 0/1 as a flag's bool, a path as a string."""
    if isinstance(value, np.generic):
        value = value.item()
    if kind(field) == "bool" and _is_int(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def docstring(fields: tuple[dataclasses.Field, ...]) -> str:
    """A config class's docstring, made from its fields' help."""
    lines = ["Everything that decides a training run.", "", "Attributes:"]
    for f in fields:
        text = f.metadata["help"]
        if "(default" not in text:
            text += f" (default: {f.default!r})"
        if "cli_default" in f.metadata:
            text += f"; the crossbow-jax command's default is {f.metadata['cli_default']!r}"
        lines.append(f"    {f.name}: {text}.")
    return "\n".join(lines)


def floats(name: str, values: Any) -> tuple[float, ...]:
    try:
        return tuple(float(e) for e in values)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={values!r} must be a sequence of numbers (epochs)") from None
