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

import pyarrow
import pyarrow.fs

from compression.errors import UserInputError

TRIALS_FILE = "trials.parquet"
REPORT_FILE = "report.md"
SWEEP_FILE = "sweep.json"


def is_uri(location: str) -> bool:
    return "://" in location


def check_storage_string(storage, what: str = "storage ") -> str:
    """The storage setting itself: a non-empty local path or URI (an empty one would silently mean
    the current folder)."""
    if not isinstance(storage, str) or not storage.strip():
        raise UserInputError(f"{what}{storage!r} is empty; give a local folder (e.g. results) or a URI "
                             f"(s3://bucket/prefix)")
    return storage


def check_location(directory: str, what: str) -> None:
    """UserInputError, before anything is computed, unless `directory` can hold files: a local folder
    that exists or can be created (its nearest existing ancestor is a folder this process can create
    folders in, and every new name fits the file system), or a URI whose file system answers and
    that is not a file. Leaves nothing behind."""
    if is_uri(directory):
        try:
            fs, base = pyarrow.fs.FileSystem.from_uri(directory)
        except (pyarrow.ArrowInvalid, ValueError) as e:
            raise UserInputError(f"{what}: {directory} is not a URI this machine can open ({e}); allowed: a local "
                                 f"folder, or a URI such as s3://bucket/prefix or gs://bucket/prefix") from None
        try:
            info = fs.get_file_info(base)
        except OSError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserInputError(f"{what}: {directory} cannot be reached ({reason}); check the URI, the "
                                 f"network and the credentials") from None
        if info.type == pyarrow.fs.FileType.File:
            raise UserInputError(f"{what}: {directory} is a file, not a folder")
        return
    path = Path(directory)
    existing = path
    while not _exists(existing):
        existing = existing.parent
    if not existing.is_dir():
        raise UserInputError(f"{what}: {existing} is a file, not a folder; choose another location")
    limit = os.pathconf(existing, "PC_NAME_MAX")
    for part in path.relative_to(existing).parts:
        if len(os.fsencode(part)) > limit:
            raise UserInputError(f"{what}: the folder name {part[:24]!r}... is {len(os.fsencode(part))} bytes long; "
                                 f"the file system of {existing} allows {limit}")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".lrsweep-check-", dir=existing))
    except OSError as e:
        raise UserInputError(f"{what}: {directory} cannot be written (creating a folder in {existing} failed: "
                             f"{e.strerror or e}); choose a location you can write to") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name too long for the file system
        return False


def sweep_directory(storage: str, name: str) -> str:
    """`<storage>/<name>`; a local storage becomes an absolute path (Tune needs one), a URI keeps its
    query (`s3://bucket/prefix?endpoint_override=...` gives `s3://bucket/prefix/<name>?endpoint_override=...`)."""
    if is_uri(storage):
        base, sep, query = storage.partition("?")
        return f"{base.rstrip('/')}/{name}{sep}{query}"
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
