"""Choosing how a device runs its learners (`execution`) by measurement, cached on disk.

`choose_execution` times one trial (`run_trial`) per candidate ("vmap", "unroll", ...)
on the run's own devices, model, batch and dtype and keeps the fastest; the decision
goes to a small JSON file per setting (`default_cache_dir()`), so the next run starts at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import jax
import numpy as np

from crossbow_jax.engine import config as config_mod
from crossbow_jax.engine import options
from crossbow_jax.engine.cache import default_cache_dir
from crossbow_jax.engine.config import ConfigError, TrainConfig
from crossbow_jax.engine.identity import fingerprint
from crossbow_jax.tuning.measure import MEMORY, OK, OOM, run_trial

ERROR = "error"  # the candidate raised an XLA error (e.g. it does not compile)
_STATUSES = (OK, OOM, MEMORY, ERROR)
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "crossbow-jax")
_WARNED: set[str] = set()  # cache folders already warned about


def default_candidates() -> tuple[str, ...]:
    """The concrete executions the config accepts (all but "auto")."""
    names = getattr(options, "EXECUTIONS", None) or config_mod.EXECUTIONS
    return tuple(e for e in names if e != "auto")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cache_key(cfg: TrainConfig, model, data, mesh, learners: int, candidates) -> dict[str, Any]:
    """What the decision depends on: model, input, layout, devices, versions, candidates."""
    sample = lambda key, x: model.init(key, data.preprocess(x, None))
    shapes = jax.eval_shape(sample, jax.random.PRNGKey(0), data.example)
    tree = json.dumps(fingerprint(shapes), sort_keys=True).encode()
    device = mesh.devices.flat[0]
    return {"model": model.name, "parameters": hashlib.sha256(tree).hexdigest()[:16],
            "input_shape": list(data.example.shape[1:]), "input_dtype": str(data.example.dtype),
            "batch_size": cfg.batch_size, "learners": learners, "algorithm": cfg.algorithm,
            "dtype": cfg.dtype, "mapper": cfg.mapper, "steps_per_dispatch": cfg.steps_per_dispatch,
            "unroll_steps": cfg.unroll_steps, "devices": mesh.size,
            "processes": jax.process_count(), "platform": device.platform,
            "device_kind": getattr(device, "device_kind", device.platform),
            "versions": {p: _version(p) for p in _PACKAGES}, "candidates": list(candidates)}  # fmt: skip


def _read(path: str, key: dict[str, Any], names: list[str]) -> dict[str, Any] | None:
    """The stored decision for `key`, or None when missing, unreadable or not for this key."""
    try:
        with open(path) as f:
            stored = json.load(f)
        rows = stored["candidates"]
        if stored["key"] != key or [r["execution"] for r in rows] != names:
            return None
        fine = all(r["status"] in _STATUSES for r in rows) and stored["chosen"] in names
        return stored if fine and rows[names.index(stored["chosen"])]["status"] == OK else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _write(path: str, record: dict[str, Any]) -> bool:
    """Writes atomically (temp file + rename); an unwritable folder warns once, never raises."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".execution-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        if folder not in _WARNED:
            _WARNED.add(folder)
            warnings.warn(f"execution cache {folder} not written: {e}", RuntimeWarning, 3)
        return False
    return True


def decision_file(
    cfg: TrainConfig, model, data, mesh, learners: int, names, cache_dir=None
) -> tuple[dict[str, Any], str | None]:
    """The cache key of a decision and its file (None: no cache; `cache_dir` None:
    `default_cache_dir()`, "": no cache)."""
    key = cache_key(cfg, model, data, mesh, learners, names)
    folder = os.fspath(default_cache_dir() if cache_dir is None else cache_dir)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key, os.path.join(folder, f"execution-{digest}.json") if folder else None


def stored_decision(path: str | None, key, names) -> dict[str, Any] | None:
    """Process 0's stored decision for `key` (None: none usable), on every process."""
    return share(_read(path, key, names) if path and jax.process_index() == 0 else None)


def store_decision(path: str | None, record: dict[str, Any]) -> str | None:
    """Process 0 writes `record` ("key", "chosen", "candidates") to `path`; returns the
    path, or None when there is none or it could not be written (warned once)."""
    if path and jax.process_index() == 0 and not _write(path, record):
        return None
    return path


def share(obj: Any) -> Any:
    """Process 0's JSON-able `obj` on every process."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    mine = np.frombuffer(json.dumps(obj).encode(), np.uint8).astype(np.int32)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(mine))))
    sent = mine if jax.process_index() == 0 else np.zeros(size, np.int32)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(sent), np.uint8)))


def _trial(measure, cfg, model, optimizer, data, mesh, learners, task) -> dict[str, Any]:
    """One candidate's row; a candidate that raises (it does not compile, or im2col cannot
    rewrite the model) is a failed row: the others may still run. A `ConfigError` is the
    request's, refused alike for every candidate before any work (`prepare`): raised."""
    try:
        t = measure(cfg, model, optimizer, data, mesh, learners, task)
        ips, compile_s, status, error = t.images_per_second, t.compile_seconds, t.status, t.error
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- in the row; raised if every candidate fails
        lines = str(e).strip().splitlines()
        ips, compile_s, status = None, None, ERROR
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]
    if status == OK and not (ips or 0) > 0:
        status, error = ERROR, f"no throughput measured ({ips})"
    return {"execution": cfg.execution, "images_per_second": ips if status == OK else None,
            "compile_seconds": compile_s, "status": status, "error": error}  # fmt: skip


def auto_execution(
    cfg: TrainConfig, model, optimizer, data, mesh, task=None, *, log=print
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Resolves `execution="auto"` by measurement (`choose_execution`); other values stand.

    The executions are compared at the run's learners per device, or, when the
    tuner chooses it ("auto"), at 4 (fewer when the data or `tune_max_learners`
    allow fewer); if no execution runs there (memory), at 1 learner.

    Returns:
        (the config with the chosen execution, the measurement report or None).
    """
    if cfg.execution != "auto":
        return cfg, None
    m = cfg.learners_per_device
    if m == "auto":
        fits = data.num_train // (mesh.size * cfg.batch_size)
        m = max(1, min(4, cfg.tune_max_learners, fits))
    try:
        report = choose_execution(cfg, model, optimizer, data, mesh, task, learners=m, log=log)
    except ConfigError:
        if m == 1 or cfg.learners_per_device != "auto":
            raise
        report = choose_execution(cfg, model, optimizer, data, mesh, task, learners=1, log=log)
    return cfg.replace(execution=report["chosen"]), report


def choose_execution(
    cfg: TrainConfig,
    model,
    optimizer,
    data,
    mesh,
    task=None,
    *,
    learners: int,
    candidates: Sequence[str] | None = None,
    log: Callable[[str], None] | None = print,
    measure: Callable[..., Any] = run_trial,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Times every candidate execution and keeps the fastest; cached on disk.

    Collective: with several processes all call it; process 0 reads and writes
    the cache and its decision is broadcast, and on a miss all measure together.

    Args:
        cfg: the run's config (batch, algorithm, dtype, `tune_steps`, ...);
            its `execution` is replaced by each candidate in turn.
        model, optimizer, data, mesh, task: the run's, as for `run_trial`.
        learners: learners per device to measure with.
        candidates: executions to try, in order (default: `default_candidates()`).
        log: where the table goes, line by line (None: silent).
        measure: the trial function (`run_trial`); tests substitute it.
        cache_dir: the cache folder (None: `default_cache_dir()`; "": no cache).

    Returns:
        A dict: "chosen", "learners", "candidates" (in the order tried:
        "execution", "images_per_second", "compile_seconds", "status",
        "error"), "cached", "cache_file" (None without a cache, or when it
        could not be written), "key", "seconds".

    Raises:
        ConfigError: no candidate, "auto" or an unknown one among them, or every one failed.
    """
    t0 = time.perf_counter()
    names = list(dict.fromkeys(default_candidates() if candidates is None else candidates))
    if not names or "auto" in names:
        raise ConfigError(f"execution candidates {names} must be concrete executions, not empty")
    configs = [cfg.replace(execution=name) for name in names]  # unknown ones: ConfigError
    key, path = decision_file(cfg, model, data, mesh, learners, names, cache_dir)
    stored = stored_decision(path, key, names)
    if stored:
        rows, chosen = stored["candidates"], stored["chosen"]
    else:
        rows = [_trial(measure, c, model, optimizer, data, mesh, learners, task) for c in configs]
        ok = [r for r in rows if r["status"] == OK]
        if not ok:
            why = "; ".join(f"{r['execution']}: {r['error'] or r['status']}" for r in rows)
            raise ConfigError(
                f"no execution of {', '.join(names)} ran for {learners} learner(s) per device "
                f"({why})"
            )
        chosen = share(max(ok, key=lambda r: r["images_per_second"])["execution"])
        path = store_decision(path, {"key": key, "chosen": chosen, "candidates": rows})
    result = {"chosen": chosen, "learners": learners, "candidates": rows,
              "cached": stored is not None, "cache_file": path, "key": key,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    if log is not None:
        for line in format_executions(result).splitlines():
            log(line)
    return result


def format_executions(report: dict[str, Any]) -> str:
    """The candidates as a text table (the chosen one marked `*`) and the decision."""
    lines = [f"{'execution':>9}  {'images/s':>10}  {'compile s':>9}  status"]
    for r in report["candidates"]:
        ips, compile_s = r.get("images_per_second"), r.get("compile_seconds")
        cells = [f"{r['execution']:>9}", f"{ips:10.1f}" if ips is not None else f"{'-':>10}",
                 f"{compile_s:9.1f}" if compile_s is not None else f"{'-':>9}", r["status"]]  # fmt: skip
        mark = " *" if r["execution"] == report["chosen"] else ""
        lines.append("  ".join(cells) + mark + (f"  ({r['error']})" if r.get("error") else ""))
    if report["cached"]:
        how = f"cached in {report['cache_file']}, {report['seconds']:.1f} s"
    elif report.get("skipped"):  # the online choice kept the default: the run is too short
        how = f"the default; {report['skipped']}"
    else:
        how = f"measured, {report['seconds']:.1f} s"
    lines.append(f"execution: {report['chosen']} ({how})")
    return "\n".join(lines)
