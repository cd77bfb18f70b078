"""Where a sweep's files live: a local folder or a URI pyarrow understands (s3://, gs://, ...).

Layout of `<storage>/<name>/`: the Tune experiment itself, `sweep.json` (the validated sweep, its
hash and its calibration key), `trials.parquet` (the results table) and `report.md` with its
plots. Every file is written whole or not at all (`write_file`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs

TRIALS_FILE = "trials.parquet"
REPORT_FILE = "report.md"
SWEEP_FILE = "sweep.json"


def is_uri(location: str) -> bool:
    return "://" in location


def sweep_directory(storage: str, name: str) -> str:
    """`<storage>/<name>`; a local storage becomes an absolute path (Tune needs one)."""
    if is_uri(storage):
        return f"{storage.rstrip('/')}/{name}"
    return str(Path(storage).expanduser().resolve() / name)


def write_file(directory: str, name: str, data: bytes) -> str:
    """Write `directory/name` atomically: a temporary file renamed over the target (local), or a
    single object upload (object stores publish an object whole, on close)."""
    if is_uri(directory):
        fs, base = pyarrow.fs.FileSystem.from_uri(directory)
        fs.create_dir(base, recursive=True)
        with fs.open_output_stream(f"{base}/{name}") as f:
            f.write(data)
        return f"{directory.rstrip('/')}/{name}"
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(folder / name)


def read_file(directory: str, name: str) -> bytes | None:
    """The bytes of `directory/name`, None when it does not exist."""
    if is_uri(directory):
        fs, base = pyarrow.fs.FileSystem.from_uri(directory)
        if fs.get_file_info(f"{base}/{name}").type == pyarrow.fs.FileType.NotFound:
            return None
        with fs.open_input_stream(f"{base}/{name}") as f:
            return f.read()
    path = Path(directory) / name
    return path.read_bytes() if path.is_file() else None


def delete_dir(directory: str, name: str) -> None:
    """Remove the folder `directory/name` (missing is fine)."""
    if is_uri(directory):
        fs, base = pyarrow.fs.FileSystem.from_uri(directory)
        if fs.get_file_info(f"{base}/{name}").type != pyarrow.fs.FileType.NotFound:
            fs.delete_dir(f"{base}/{name}")
        return
    shutil.rmtree(Path(directory) / name, ignore_errors=True)
