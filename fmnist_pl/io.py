"""Writing files so that a crash never leaves a half-written one that looks whole."""

from __future__ import annotations

import errno
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fmnist_pl.errors import FmnistError

# Errors about a place, not about the program: the user frees space or picks another folder; a retry cannot help.
PLACE_ERRORS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class PlaceError(FmnistError):
    """A folder that cannot be written: full, read-only or not ours."""


def place_error(error: BaseException, where: str | Path | None = None) -> PlaceError | None:
    """The one-line error for a full disk, a read-only folder or a denied permission (`where`: the folder, when
    the error itself names no file); None for any other error."""
    if isinstance(error, PlaceError):
        return error
    if not isinstance(error, OSError) or error.errno not in PLACE_ERRORS:
        return None
    written = error.filename2 or error.filename  # a failed copy names its source first, its destination second
    place = Path(written).parent if written else where
    at = f"{place}: " if place else ""
    return PlaceError(f"{at}cannot write there, {PLACE_ERRORS[error.errno]}; free space or fix the folder's "
                      "permissions, or choose another folder")  # fmt: skip


@contextmanager
def naming_place(folder: str | Path) -> Iterator[None]:
    """Turn a full disk, a read-only or a foreign folder met inside the block into the PlaceError naming `folder`
    (when the error names no file itself); other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        raise (place_error(e, folder) or e) from e


def check_writable(folder: str | Path) -> None:
    """Create `folder` if needed and write a file there, so that a folder that cannot take a run's outputs is
    refused in one line before anything starts; raises PlaceError."""
    folder = Path(folder)
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        with naming_place(folder):
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"0" * 4096)
    finally:
        probe.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def write_record_on_failure(path: str | Path, text: str) -> None:
    """Record a failure in `path` if at all possible: atomically where there is room, else in place. On a full
    disk the temporary file of an atomic write finds no space, while rewriting the small file reuses its own
    blocks. Gives up silently: the failure itself is what the user must see."""
    try:
        write_text_atomic(path, text)
    except OSError:
        try:
            with open(path, "r+") as f:
                f.write(text)
                f.truncate()
        except OSError:
            pass
