"""The user's cache folder: measured execution decisions and compiled programs.

`default_cache_dir()` holds the execution choices (`crossbow_jax.tuning.executions`)
and, in its `xla` sub-folder, JAX's persistent compilation cache, which
`enable_compilation_cache` turns on before a run's first compilation, so that a
second run of the same model, batch and layout loads its programs instead of
compiling them. `CROSSBOW_JAX_CACHE=""` turns both off.
"""

from __future__ import annotations

import importlib.util
import os

import jax

XLA_FOLDER = "xla"
MAX_BYTES = 4 << 30  # the compilation cache's size bound (least recently used go first)
_hits = 0  # programs loaded from the persistent cache in this process (once listening)
_listening = False


def default_cache_dir() -> str:
    """The cache folder: `$CROSSBOW_JAX_CACHE` if set ("": no cache), else
    `$XDG_CACHE_HOME/crossbow_jax`, else `~/.cache/crossbow_jax`.
    """
    if (folder := os.environ.get("CROSSBOW_JAX_CACHE")) is not None:
        return folder
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "crossbow_jax")


def enable_compilation_cache() -> str | None:
    """Turns on JAX's persistent compilation cache in `default_cache_dir()/xla`.

    Called by `train`, `tune` and the engine's `fit` before they compile; a
    second call does nothing. A cache the user configured for JAX
    (`JAX_COMPILATION_CACHE_DIR`, `jax.config.update("jax_compilation_cache_dir",
    ...)`) is left as it is, and so is `jax_enable_compilation_cache=False`.
    When it sets the folder, it also bounds it to `MAX_BYTES` (JAX then evicts
    the least recently used programs and locks the folder around each read and
    write, so processes sharing it never read a half-written program; this
    needs the `filelock` package, without which the folder is unbounded), and
    writes every program, not only those that took over JAX's default 1 s to
    compile (`jax_persistent_cache_min_compile_time_secs`, when left at 1):
    on a CPU most of a small model's programs compile in less.

    Returns:
        The compilation cache folder in use, or None (caching off).
    """
    _count_hits()
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    folder = default_cache_dir()
    if not folder or not jax.config.jax_enable_compilation_cache:
        return None
    path = os.path.join(folder, XLA_FOLDER)
    jax.config.update("jax_compilation_cache_dir", path)
    if jax.config.jax_compilation_cache_max_size == -1 and importlib.util.find_spec("filelock"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if jax.config.jax_persistent_cache_min_compile_time_secs == 1.0:  # JAX's default
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def cache_hits() -> int:
    """Programs this process has loaded from the persistent compilation cache so far
    (counted from the first `enable_compilation_cache`)."""
    return _hits


def _count_hits() -> None:
    global _listening
    if not _listening:
        _listening = True
        jax.monitoring.register_event_listener(_heard)


def _heard(event: str, **_) -> None:
    global _hits
    if event == "/jax/compilation_cache/cache_hits":
        _hits += 1
