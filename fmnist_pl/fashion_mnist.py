"""The Fashion-MNIST files: where they are (a named folder, $FMNIST_DATA_DIR, a local copy, the official download),
checked (headers, lengths, the official release's content hashes), decoded once into tensors and cached with a
digest that every read checks. Images given to `predict`: predict_images.py."""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

from fmnist_pl.errors import DataError, DownloadError
from fmnist_pl.io import PLACE_ERRORS, atomic_write

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 28
DATA_DIR_ENV = "FMNIST_DATA_DIR"
# Debian's `dataset-fashion-mnist` package installs the official files here.
KNOWN_LOCAL_COPIES = (Path("/usr/share/datasets/fashion-mnist"),)

# file stem -> (split, kind, image count of the official release, SHA-256 of the *decompressed* bytes).
# Content hashes rather than the .gz MD5s: re-gzipped copies (Debian's, for one) hold the same bytes
# in a different .gz wrapper, and it is the bytes that must be right.
OFFICIAL_FILES = {
    "train-images-idx3-ubyte": (
        "train",
        "images",
        60_000,
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train-labels-idx1-ubyte": (
        "train",
        "labels",
        60_000,
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "t10k-images-idx3-ubyte": (
        "test",
        "images",
        10_000,
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "t10k-labels-idx1-ubyte": (
        "test",
        "labels",
        10_000,
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # uint8 data, 3 resp. 1 dimensions
CACHE_FORMAT = 2  # bump when the cached tensors' layout changes


def default_cache_dir() -> Path:
    """Where decoded tensors and downloads go: $XDG_CACHE_HOME/fmnist_pl (~/.cache/fmnist_pl)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmnist_pl"


def _read_bytes(path: Path) -> bytes:
    """The decompressed bytes of `path`, gzip'd or not."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut-off .gz raises EOFError
        raise unreadable(path, e) from e


def unreadable(path: Path, error: Exception) -> DataError:
    """The error for a data file that cannot be opened or decompressed, by its real cause."""
    if isinstance(error, PermissionError):
        return DataError(f"{path}: cannot be read, permission denied; make it readable (chmod a+r) or copy it")
    return DataError(f"{path}: cannot be read ({error}); the file is truncated or corrupt, copy or download it again")


def read_idx(path: Path, kind: str, data: bytes | None = None) -> np.ndarray:
    """Parse and check one IDX file of `kind` 'images' (N×28×28 uint8) or 'labels' (N uint8, 0–9).

    `data`, when given, is the file's already decompressed content.
    """
    data = _read_bytes(path) if data is None else data
    header_len = 16 if kind == "images" else 8
    if len(data) < header_len:
        raise DataError(
            f"{path}: only {len(data)} bytes, too short to be an IDX {kind} file; copy or download it again"
        )
    magic, count = np.frombuffer(data[:8], dtype=">u4")
    if magic != IDX_MAGIC[kind]:
        raise DataError(
            f"{path}: magic number {magic:#010x} is not that of an IDX {kind} file ({IDX_MAGIC[kind]:#010x}); "
            "is it the right file?"
        )
    if kind == "images":
        rows, cols = np.frombuffer(data[8:16], dtype=">u4")
        if (rows, cols) != (IMAGE_SIZE, IMAGE_SIZE):
            raise DataError(f"{path}: images are {rows}×{cols}, Fashion-MNIST images are 28×28")
    item_size = IMAGE_SIZE * IMAGE_SIZE if kind == "images" else 1
    expected = header_len + int(count) * item_size
    if len(data) != expected:
        raise DataError(
            f"{path}: header says {count} {kind} ({expected} bytes) but the file holds {len(data)} bytes; "
            "it is truncated or corrupt, copy or download it again"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header_len)
    if kind == "images":
        return array.reshape(int(count), IMAGE_SIZE, IMAGE_SIZE)
    if array.size and array.max() > 9:
        raise DataError(f"{path}: holds label {array.max()}, Fashion-MNIST labels are 0–9")
    return array


def check_headers(directory: Path) -> dict[str, int]:
    """A quick look at a data folder before a pipeline starts anything: every IDX file there, gzip'd or not, opens,
    starts with the right magic number and is as long as its header says (a .gz file's trailer holds its
    decompressed length, so nothing is decompressed). Returns each file's item count. The full checks (content
    checksums) come when the data loads."""
    counts = {}
    for stem, (_, kind, _, _) in OFFICIAL_FILES.items():
        path = _file_in(directory, stem)
        if path is None:
            continue  # locate_dataset names missing files, with the fix
        try:
            with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
                head = f.read(8)
            if path.suffix == ".gz":
                with open(path, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    length = int.from_bytes(f.read(4), "little")  # ISIZE: the decompressed length mod 2**32
            else:
                length = path.stat().st_size
        except (OSError, EOFError) as e:
            raise unreadable(path, e) from e
        if len(head) < 8 or int.from_bytes(head[:4], "big") != IDX_MAGIC[kind]:
            raise DataError(f"{path}: not an IDX {kind} file (wrong magic number); is it the right file?")
        count = int.from_bytes(head[4:8], "big")
        expected = (16 + count * IMAGE_SIZE * IMAGE_SIZE if kind == "images" else 8 + count) % 2**32
        if length != expected:
            raise DataError(
                f"{path}: header says {count:,} {kind} but the file holds {length:,} bytes, not "
                f"{expected:,}; it is truncated or corrupt, copy or download it again"
            )
        counts[stem] = count
    return counts


def missing_files(directory: Path) -> list[str]:
    """The Fashion-MNIST files (.gz or not) that `directory` lacks."""
    return [stem for stem in OFFICIAL_FILES if _file_in(directory, stem) is None]


def _file_in(directory: Path, stem: str) -> Path | None:
    """`stem` or `stem.gz` in `directory`, None if neither; a DataError for a folder that cannot be read or a
    folder in a data file's place."""
    for name in (stem, stem + ".gz"):
        path = directory / name
        try:
            if path.is_file():
                return path
            if path.is_dir():
                raise DataError(f"{path} is a folder, not a data file; put the IDX file {name} there instead")
        except PermissionError as e:
            raise DataError(
                f"{directory}: cannot be read, permission denied; make the folder readable "
                "(chmod a+rx) or use another one"
            ) from e
    return None


def _complete(directory: Path) -> bool:
    return all(_file_in(directory, stem) for stem in OFFICIAL_FILES)


def check_download_reachable(cache_dir: Path, option: str) -> None:
    """Before a download: can the official mirrors' names be resolved at all (at most 5 s)? If not, there is no
    network, and a DataError (never retried) says where the data was looked for and what to do; `option` is how
    the caller's users name a data folder (`--data.data_dir`, `--data-dir`)."""
    from torchvision.datasets import FashionMNIST

    hosts = [urlsplit(mirror).hostname for mirror in FashionMNIST.mirrors]
    errors: list[str] = []

    def resolve() -> None:
        for host in hosts:
            try:
                socket.getaddrinfo(host, 80)
                return
            except OSError as e:
                errors.append(f"cannot resolve {host}: {e.strerror or e}")

    lookup = threading.Thread(target=resolve, daemon=True)
    lookup.start()
    lookup.join(timeout=5)
    if lookup.is_alive():
        errors.append(f"no answer from the name server for {hosts[0]} in 5 s")
    elif len(errors) < len(hosts):
        return
    looked_in = [
        f"{option} and ${DATA_DIR_ENV} (not set)",
        *map(str, KNOWN_LOCAL_COPIES),
        str(cache_dir / "download" / "FashionMNIST" / "raw"),
    ]
    raise DataError(
        f"Fashion-MNIST not found (looked in {', '.join(looked_in)}) and no network to download it "
        f"({errors[0]}); pass {option} DIR, a folder with the four IDX files, or install Debian's "
        "dataset-fashion-mnist package"
    )


def _download(root: Path, option: str) -> Path:
    """Fetch the official files through torchvision (which checks their MD5s); return the folder holding them."""
    from torchvision.datasets import FashionMNIST

    check_download_reachable(root.parent, option)
    try:
        for train in (True, False):
            FashionMNIST(root=str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        reason = " ".join(str(e).split())[:200]  # torchvision's message spans lines, one per mirror
        raise DownloadError(
            f"could not download Fashion-MNIST ({type(e).__name__}: {reason}); point {option} or ${DATA_DIR_ENV} "
            "at a folder with the four IDX files, or install Debian's dataset-fashion-mnist package"
        ) from e
    return root / "FashionMNIST" / "raw"


def local_copy(cache_dir: Path) -> Path | None:
    """The first complete copy of the four files on this machine (Debian's, an earlier download), or None."""
    for directory in (*KNOWN_LOCAL_COPIES, cache_dir / "download" / "FashionMNIST" / "raw"):
        if _complete(directory):
            return directory
    return None


def locate_dataset(
    data_dir: str | Path | None, cache_dir: Path, download: bool, option: str = "--data.data_dir"
) -> Path:
    """The folder holding the four IDX files: the one named, known local copies, else the official download.
    `option` is how the caller's users name a data folder, for the errors."""
    named = data_dir or os.environ.get(DATA_DIR_ENV)
    if named:
        directory = Path(named).expanduser()
        if not directory.is_dir():
            what = "is a file, not a folder" if directory.exists() else "does not exist"
            raise DataError(f"{option} {directory} {what}; name the folder that holds the four IDX files")
        if missing := missing_files(directory):
            raise DataError(
                f"{directory} lacks {', '.join(missing)} (.gz or not); put the Fashion-MNIST IDX files there "
                f"or unset {option} / ${DATA_DIR_ENV} to use a local copy or the download"
            )
        return directory
    if (directory := local_copy(cache_dir)) is not None:
        return directory
    if not download:
        raise DataError(
            f"Fashion-MNIST not found (looked in {', '.join(str(d) for d in KNOWN_LOCAL_COPIES)}) and download=False; "
            f"set {option} or ${DATA_DIR_ENV}, or install Debian's dataset-fashion-mnist package"
        )
    return _download(cache_dir / "download", option)


@dataclass
class FashionMNISTTensors:
    """The decoded dataset: uint8 images N×28×28 and int64 labels, plus where it came from."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source_dir: str
    sha256: dict[str, str]  # file stem -> SHA-256 of its decompressed bytes

    def digest(self) -> str:
        """SHA-256 of the decoded tensors' bytes (about 50 MB: tens of milliseconds)."""
        hasher = hashlib.sha256()
        for tensor in (self.train_images, self.train_labels, self.test_images, self.test_labels):
            hasher.update(tensor.contiguous().numpy())
        return hasher.hexdigest()


def decode_dataset(directory: Path, require_official: bool) -> FashionMNISTTensors:
    """Read and verify the four IDX files in `directory`."""
    arrays, sha256, paths = {}, {}, {}
    for stem, (split, kind, official_count, official_sha) in OFFICIAL_FILES.items():
        path = paths[split, kind] = _file_in(directory, stem)
        content = _read_bytes(path)
        arrays[split, kind] = read_idx(path, kind, content)
        sha256[stem] = hashlib.sha256(content).hexdigest()
        if require_official:
            if len(arrays[split, kind]) != official_count:
                raise DataError(
                    f"{path}: {len(arrays[split, kind])} {kind}, the official file has {official_count:,}; "
                    "use the complete file, or set --data.require_official false for your own subset"
                )
            if sha256[stem] != official_sha:
                raise DataError(
                    f"{path}: content differs from the official Fashion-MNIST file (SHA-256 {sha256[stem][:12]}…); "
                    "copy or download it again, or set --data.require_official false for your own data"
                )
    for split in ("train", "test"):
        n_images, n_labels = len(arrays[split, "images"]), len(arrays[split, "labels"])
        if n_images != n_labels:
            raise DataError(
                f"{paths[split, 'images']} holds {n_images} images but {paths[split, 'labels'].name} {n_labels} labels; "
                "one of them is from another dataset or incomplete"
            )
    return FashionMNISTTensors(
        train_images=torch.from_numpy(arrays["train", "images"].copy()),
        train_labels=torch.from_numpy(arrays["train", "labels"].astype(np.int64)),
        test_images=torch.from_numpy(arrays["test", "images"].copy()),
        test_labels=torch.from_numpy(arrays["test", "labels"].astype(np.int64)),
        source_dir=str(directory),
        sha256=sha256,
    )


def _cache_path(directory: Path, cache_dir: Path, require_official: bool) -> Path:
    # Keyed on each source file's path, size and mtime: a replaced file means a new decode.
    stats = []
    for stem in OFFICIAL_FILES:
        path = _file_in(directory, stem).resolve()
        stat = path.stat()
        stats.append((str(path), stat.st_size, stat.st_mtime_ns))
    key = json.dumps([CACHE_FORMAT, require_official, stats])
    return cache_dir / f"decoded-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def load_dataset(
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = True,
    require_official: bool = True,
    option: str = "--data.data_dir",
) -> FashionMNISTTensors:
    """Find, verify and decode Fashion-MNIST, or load the tensors a previous call cached on disk (`option`: how the
    caller's users name a data folder, for the errors)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    directory = locate_dataset(data_dir, cache_dir, download, option)
    cache = _cache_path(directory, cache_dir, require_official)
    if cache.is_file():
        if (tensors := _read_verified_cache(cache)) is not None:
            return tensors
        logging.getLogger(__name__).warning(
            f"{cache}: the decoded-data cache fails its checksum (damaged or from another version); "
            f"decoding {directory} again"
        )
    tensors = decode_dataset(directory, require_official)
    try:
        # Serialized in memory, then written as plain bytes: on a full disk torch.save's own writer reports only
        # "[enforce fail at inline_container.cc] unexpected pos", while write_bytes raises ENOSPC, which says why.
        buffer = io.BytesIO()
        torch.save({**vars(tensors), "digest": tensors.digest()}, buffer)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except OSError as e:
        reason = PLACE_ERRORS.get(e.errno) or e.strerror or str(e)
        warn_once(
            f"{cache.parent}: cannot write the decoded-data cache there ({reason}); going on without it "
            "(each run decodes the files again)"
        )
    return tensors


@functools.cache
def warn_once(message: str) -> None:
    """Log a warning the first time this process meets it: the CLI and the pipeline load the data more than once
    (prepare_data and setup; the download and report steps), and one line says it all."""
    logging.getLogger(__name__).warning(message)


def _read_verified_cache(cache: Path) -> FashionMNISTTensors | None:
    """The cached tensors if their bytes still hash to the digest stored with them, else None. A flipped byte in
    the cache would otherwise be trained on while the source files' checksums say all is well."""
    try:
        stored = torch.load(cache, weights_only=True)
        digest = stored.pop("digest")
        tensors = FashionMNISTTensors(**stored)
    except Exception:  # damaged beyond loading, or written by another version: decode again
        return None
    return tensors if tensors.digest() == digest else None
