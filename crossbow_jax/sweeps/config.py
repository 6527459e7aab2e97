"""A sweep's config: its checks (one-line `ConfigError`s before any run) and sweep files.

`check_config` fills the optional entries of a config dict (`measure`,
`fixed`, `seeds`, `table`) and refuses what cannot run: a missing name or
grid, an unknown measure, settings that are not `TrainConfig` fields or data
keys, a label that looks like a misspelt setting, a model or data set that
does not exist, a value `TrainConfig` refuses. `load_sweep_file` runs a
user's `get_config(quick)` from a Python file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from crossbow_jax.engine.config import ConfigError, TrainConfig, make_config

DATA_KEYS = ("model", "dataset", "train_examples", "test_examples", "synthetic_like")
"""Settings that pick the model and data (arguments of `train`, not `TrainConfig` fields)."""

TRIAL_KEYS = ("trial_steps", "trial_repeats")
"""Settings of a throughput trial (`measure: "throughput"`): steps per timing, timings."""

MEASURE_NAMES = ("train", "throughput")

DEFAULT_FIGURES = {
    "train": ["final_accuracy", "best_accuracy", "epochs_to_target", "images_per_second"],
    "throughput": ["images_per_second"],
}
"""The table's figures when a config names none."""

HELP = "see docs/sweeps.md"

ENTRIES = (
    "name", "measure", "fixed", "grid", "seeds", "devices", "reuse",
    "caption", "table", "plots", "ratios",
)  # fmt: skip
"""The entries a config may have (`crossbow_jax.sweeps` describes each)."""


def setting_keys() -> frozenset[str]:
    """The keys of a grid point or `fixed` that are settings of a run (the rest are labels)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return frozenset(fields | set(DATA_KEYS) | set(TRIAL_KEYS))


def parse_shard(shard: Any) -> tuple[int, int]:
    """`(i, n)` from a tuple or an "I/N" string, with 0 <= i < n; raises `ConfigError`."""
    if isinstance(shard, str):
        index, _, count = shard.partition("/")
        parsed = (int(index), int(count)) if index.isdigit() and count.isdigit() else None
    elif isinstance(shard, (tuple, list)) and len(shard) == 2:
        parsed = tuple(shard) if all(type(v) is int for v in shard) else None
    else:
        parsed = None
    if parsed is None or not 0 <= parsed[0] < parsed[1]:
        raise ConfigError(f"shard {shard!r} is not I/N with 0 <= I < N; pass e.g. 0/2 or (0, 2)")
    return parsed


def check_seeds(seeds: Any) -> int | None:
    """`seeds` if it is None or an int >= 1; raises `ConfigError`."""
    if seeds is not None and (type(seeds) is not int or seeds < 1):
        raise ConfigError(f"seeds={seeds!r} is not an integer >= 1; pass e.g. seeds=3")
    return seeds


def _misspelt(key: str, known) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_point(where: str, point: Any, keys: frozenset[str]) -> None:
    if not isinstance(point, dict):
        raise ConfigError(f"{where} is {point!r}, not a dict; write it as {{'setting': value}}")
    for key in point:
        if not isinstance(key, str):
            raise ConfigError(f"{where} has the key {key!r}; keys are setting or label names")
        if key not in keys and key != "seeds" and (hint := _misspelt(key, keys)):
            raise ConfigError(
                f"{where} has the label {key!r}{hint}; rename it if it is a label, "
                f"or fix it if it is a setting ({HELP})"
            )
    seeds = point.get("seeds", 1)
    if type(seeds) is not int or seeds < 1:
        raise ConfigError(f"{where} has seeds={seeds!r}; it must be an integer >= 1")


def _default_table(config: dict[str, Any]) -> dict[str, list[str]]:
    """Group by the grid's labels, else by the settings that differ between its points."""
    keys = setting_keys()
    found: dict[str, None] = {}
    for point in config["grid"]:
        found.update(dict.fromkeys(k for k in point if k not in keys and k != "seeds"))
    if not found:
        for point in config["grid"]:
            found.update(dict.fromkeys(k for k in point if k in keys))
    return {"group": list(found), "figures": DEFAULT_FIGURES[config["measure"]]}


def _check_run(where: str, settings: dict[str, Any], measure: str) -> None:
    """The settings of one run: a model and data set that exist, values `TrainConfig` takes."""
    from crossbow_jax.data import dataset_names
    from crossbow_jax.models import model_names

    for key, names in (("model", model_names()), ("dataset", dataset_names())):
        if key not in settings:
            raise ConfigError(f"{where} sets no {key!r}; add e.g. '{key}': '{names[0]}' to fixed")
        if isinstance(settings[key], str) and settings[key] not in names:
            raise ConfigError(
                f"{where} has {key}={settings[key]!r}{_misspelt(settings[key], names)}; "
                f"valid ones: {', '.join(names)}"
            )
    skip = DATA_KEYS + (TRIAL_KEYS if measure == "throughput" else ())
    try:
        make_config(**{k: v for k, v in settings.items() if k not in skip})
    except ConfigError as e:
        raise ConfigError(f"{where}: {' '.join(str(e).split())}") from None


def check_config(config: Any, name: str | None = None) -> dict[str, Any]:
    """A sweep config with its optional entries filled, checked before any run.

    Args:
        config: the dict a `get_config(quick)` returns (see `crossbow_jax.sweeps`).
        name: the name to use when the config has none (a sweep file's stem).

    Returns:
        A new dict: `measure` (default "train"), `fixed` ({}), `seeds` (1) and
        `table` (grouped by the grid's labels) filled in.

    Raises:
        ConfigError: one line naming the entry that cannot work and the fix.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"a sweep config is a dict, not {type(config).__name__}; {HELP}")
    config = dict(config)
    for entry in config:
        if entry not in ENTRIES:
            raise ConfigError(
                f"the config has the entry {entry!r}{_misspelt(str(entry), ENTRIES)}; "
                f"valid ones: {', '.join(ENTRIES)}"
            )
    if name is not None:
        config.setdefault("name", name)
    if not isinstance(config.get("name"), str) or not re.fullmatch(r"[\w.-]+", config["name"]):
        raise ConfigError(
            f"the config's name is {config.get('name')!r}; give it a name like 'my_sweep' "
            "(its rows go to <out>/<name>.jsonl)"
        )
    config.setdefault("measure", "train")
    if config["measure"] not in MEASURE_NAMES:
        raise ConfigError(f"measure {config['measure']!r} is not one of {', '.join(MEASURE_NAMES)}")
    grid = config.get("grid")
    if not isinstance(grid, (list, tuple)) or not grid:
        raise ConfigError(
            f"the config's grid is {grid!r}; it must be a non-empty list of dicts, "
            "e.g. [{'learning_rate': 0.1}, {'learning_rate': 0.01}]"
        )
    config["seeds"] = check_seeds(config.get("seeds", 1)) or 1
    fixed = config.setdefault("fixed", {})
    keys = setting_keys()
    if not isinstance(fixed, dict):
        raise ConfigError(f"the config's fixed is {fixed!r}; it must be a dict of settings")
    for key in fixed:
        if key not in keys:
            raise ConfigError(
                f"fixed has {key!r}{_misspelt(key, keys)}, not a setting; fixed takes "
                f"TrainConfig fields and {', '.join(DATA_KEYS + TRIAL_KEYS)}"
            )
    for i, point in enumerate(grid):
        _check_point(f"grid point {i}", point, keys)
        settings = {**fixed, **{k: v for k, v in point.items() if k in keys}}
        _check_run(f"grid point {i}", settings, config["measure"])
    devices = config.get("devices")
    if devices is not None and (type(devices) is not int or devices < 1):
        raise ConfigError(f"the config's devices is {devices!r}; it must be an integer >= 1")
    reuse = config.get("reuse", ())
    if isinstance(reuse, str) or not all(isinstance(r, str) for r in reuse):
        raise ConfigError(f"the config's reuse is {reuse!r}; it must be a list of sweep names")
    table = config.setdefault("table", _default_table(config))
    if not (isinstance(table, dict) and {"group", "figures"} <= set(table)):
        raise ConfigError(
            f"the config's table is {table!r}; write it as "
            "{'group': [keys], 'figures': [figures]}"
        )
    return config


def load_sweep_file(path: str | Path, quick: bool = False) -> dict[str, Any]:
    """The checked config of a sweep file: a .py file whose `get_config(quick)` returns it.

    The file's folder is put first on `sys.path` while it loads (so it can
    import a helper module beside it); a config without a name takes the
    file's stem.

    Raises:
        ConfigError: the file is missing or not .py, defines no `get_config`,
            or its config does not pass `check_config`.
    """
    path = Path(path)
    if path.suffix != ".py":
        raise ConfigError(
            f"sweep file {str(path)!r} is not a .py file; pass a Python file defining "
            "get_config(quick)"
        )
    if not path.is_file():
        raise ConfigError(
            f"sweep file {str(path)!r} does not exist; pass the path of a .py file "
            "defining get_config(quick)"
        )
    folder = str(path.resolve().parent)
    spec = importlib.util.spec_from_file_location(f"_crossbow_jax_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"sweep file {str(path)!r} defines no get_config(quick); add "
            "`def get_config(quick=False): return {...}` returning the sweep's config"
        )
    return check_config(get_config(quick=quick), name=path.stem)
