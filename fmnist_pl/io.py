"""Writing files so that a crash never leaves a half-written one that looks whole."""

from __future__ import annotations

import errno
import hashlib
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
    return PlaceError(
        f"{at}cannot write there, {PLACE_ERRORS[error.errno]}; free space or fix the folder's "
        "permissions, or choose another folder"
    )


@contextmanager
def naming_place(folder: str | Path) -> Iterator[None]:
    """Turn a full disk, a read-only or a foreign folder met inside the block into the PlaceError naming `folder`
    (when the error names no file itself); other errors pass unchanged."""
    try:
        yield
    except OSError as e:
        raise (place_error(e, folder) or e) from e


# Kernel file systems that show the system's state as files: nothing a run writes belongs there.
PSEUDO_FILE_SYSTEMS = {
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "cgroup",
    "cgroup2",
    "debugfs",
    "tracefs",
    "securityfs",
    "configfs",
    "pstore",
    "bpf",
    "efivarfs",
    "fusectl",
    "mqueue",
    "binfmt_misc",
    "autofs",
}


def check_output_place(folder: str | Path, option: str) -> None:
    """Refuse, in one line naming it, an output folder that cannot be one: an existing file, a path under a file,
    or a place on a kernel pseudo file system (/proc, /sys); writes nothing. `option` is how the user named it."""
    folder = Path(folder).expanduser().absolute()
    for place in (folder, *folder.parents):
        if place.exists() and not place.is_dir():
            where = "is a file" if place == folder else f"lies under {place}, which is a file"
            raise PlaceError(f"{option} {folder} {where}, not a folder; choose another folder")
        if place.exists():
            break
    file_system = mount_type(folder)
    if file_system in PSEUDO_FILE_SYSTEMS:
        raise PlaceError(
            f"{option} {folder} lies on the kernel's {file_system} file system, which holds no files of "
            "yours; choose another folder"
        )


def mount_type(path: Path) -> str | None:
    """The type of the file system `path` lies on (Linux /proc/self/mounts; elsewhere None)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/self/mounts").read_text().splitlines()]
    except OSError:
        return None
    mounted = [(Path(point.replace("\\040", " ")), kind) for point, kind in mounts]
    within = [(point, kind) for point, kind in mounted if path == point or point in path.parents]
    return max(within, key=lambda m: len(m[0].parts))[1] if within else None


def check_writable(folder: str | Path, option: str = "output folder") -> None:
    """Create `folder` if needed and write a file there, so that a folder that cannot take a run's outputs is
    refused in one line before anything starts; raises PlaceError."""
    check_output_place(folder, option)
    folder = Path(folder)
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        with naming_place(folder):
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"0" * 4096)
    except OSError as e:  # none of the place errors above: still the folder's fault, and still one line
        raise PlaceError(f"{option} {folder}: cannot write there ({e.strerror or e}); choose another folder") from e
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


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (a 27 MB checkpoint: about 30 ms)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
