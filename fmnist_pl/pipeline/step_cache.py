"""The step cache: each training and evaluation runs in a folder named by a key of what decides its result
(`<output dir>/steps/train-bn_cnn-seed0-<key>/`), and a folder with a `done.json` is reused instead of rerun.

Prefect's own task cache (`cache_key_fn`) is not used for this: it stores a task's return value in Prefect's
result storage, not the step's files, so a cached result could point at a folder deleted since, and it cannot
wait on a step another run is still computing. Here the files are the cache: `done.json` is written only once
every output exists, and the folder's lock is an flock that the kernel releases when its holder dies (Prefect's
file-system lock manager leaves a killed holder's lock in place until it expires, or for good without one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import time
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from fmnist_pl import __version__
from fmnist_pl.errors import ConfigError
from fmnist_pl.io import file_sha256, write_text_atomic
from fmnist_pl.networks import read_checkpoint
from fmnist_pl.pipeline.processes import run_logger, stopping
from fmnist_pl.pipeline.run_record import DataRecord, StepResult


def step_key(**inputs: object) -> str:
    """A short hash of everything a step's result depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_key(
    network: str, seed: int, config: Path, fit_options: list[str], data: DataRecord, threads: int | None
) -> str:
    """A training step's cache key: what decides its result. The `fit` options (less the data's folder: its
    checksums stand in), the seed, the config's text, the code's version and the CPU threads (they change a
    convolution's sums). The launcher changes how, not what."""
    return step_key(
        step="train",
        network=network,
        seed=seed,
        config=config.read_text(),
        data=data.sha256,
        version=__version__,
        options=fit_options,
        threads=threads,
    )


def export_key(checkpoint: Path, data: DataRecord) -> str:
    """An export step's cache key: the checkpoint's bytes, the data its parity check runs on, and the code."""
    return step_key(step="export", checkpoint=file_sha256(checkpoint), data=data.sha256, version=__version__)


def evaluation_key(checkpoint: Path, data: DataRecord, training_split: bool) -> str:
    """An evaluation step's cache key: the bytes of the checkpoint it evaluates (a retrained or replaced
    checkpoint is evaluated again; a moved or copied one is the same), the data, the code, and whether it predicts
    the training split too."""
    return step_key(
        step="evaluate",
        checkpoint=file_sha256(checkpoint),
        data=data.sha256,
        version=__version__,
        training_split=training_split,
    )


def reuse_finished(work: Path, what: str, outputs: list[Path]) -> StepResult | None:
    """A finished step's recorded result, if `work` holds one whose promised `outputs` are all still there, with
    the sizes recorded (and each checkpoint still a whole zip archive). The result's `dir` is where the step is
    now, so a moved or copied output folder reuses its own files. A record whose files are gone or changed is set
    aside with one warning, and the step runs again from scratch: it is never reused on trust."""
    done = work / "done.json"
    if not done.is_file():
        return None
    try:
        record = json.loads(done.read_text())
        sizes = record.pop("outputs", None)  # None: a record of version 0.4.0, which kept no sizes
        result = StepResult.from_record(record, dir=str(work), cached=True)
    except (ValueError, TypeError, AttributeError):
        problem = "its done.json is damaged"
    else:
        problem = next(filter(None, (output_problem(work, path, sizes) for path in outputs)), None)
    if problem:
        aside = set_aside(done, "stale")
        for checkpoint in sorted(work.rglob("*.ckpt")):  # a resumed finished fit would write no best.ckpt
            set_aside(checkpoint, "stale")
        run_logger().warning(f"not reusing finished {what} in {work}: {problem}; it runs again ({aside.name} kept)")
        return None
    run_logger().info(f"reusing finished {what} {work}")
    return result


def output_problem(work: Path, path: Path, sizes: dict | None) -> str | None:
    """Why a finished step's output `path` cannot be reused (missing, another size than recorded, a cut-off
    checkpoint), or None."""
    name = path.relative_to(work).as_posix()
    if not path.is_file():
        return f"{name} is missing"
    size = path.stat().st_size
    if sizes is not None and sizes.get(name) != size:
        return f"{name} is {size:,} bytes, the record says {sizes.get(name)}"
    if path.suffix == ".ckpt" and not zipfile.is_zipfile(path):  # reads the archive's end record only
        return f"{name} is not a whole checkpoint"
    return None


def mark_finished(work: Path, result: StepResult, outputs: list[Path]) -> StepResult:
    """Record a step's result in its folder, from then on reused; only when every output it promises exists. The
    record names no absolute path (`dir` is the folder itself), and holds each output's size for reuse_finished."""
    missing = [str(path.relative_to(work)) for path in outputs if not path.is_file()]
    if missing:
        raise RuntimeError(f"{work.name} ended without writing {', '.join(missing)}; see its log in {work}")
    sizes = {path.relative_to(work).as_posix(): path.stat().st_size for path in outputs}
    record = {key: value for key, value in dataclasses.asdict(result).items() if key not in ("dir", "cached")}
    write_text_atomic(work / "done.json", json.dumps({**record, "outputs": sizes}, indent=2) + "\n")
    return dataclasses.replace(result, dir=str(work), cached=False)


@contextlib.contextmanager
def step_lock(work: Path) -> Iterator[object]:
    """Own a step folder: one process at a time trains or evaluates into it. Another run of the same step waits
    here, then finds the result and reuses it. The lock is an flock on `.lock` (which names its owner's PID): the
    kernel releases it when the owner dies, so a killed run never leaves a stale lock behind."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / ".lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "another process"
            run_logger().info(f"waiting for {owner}, which is running this step in {work}")
            while True:  # polled, not blocking: a stopping flow must not hang on another run's lock
                if stopping():
                    raise RuntimeError("the pipeline is stopping") from None
                time.sleep(1)
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
        lock.seek(0)
        lock.truncate()
        lock.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield lock


def set_aside(checkpoint: Path, why: str) -> Path:
    """Rename `checkpoint` to `<name>.<why>-<time>`: kept for inspection, never loaded again."""
    aside = checkpoint.with_name(f"{checkpoint.name}.{why}-{datetime.now():%Y%m%d-%H%M%S}")
    checkpoint.rename(aside)
    return aside


def set_aside_if_damaged(checkpoint: Path) -> bool:
    """A last.ckpt that cannot be read (a crash mid-write on a filesystem without atomic rename, a full disk) is
    renamed and logged, so that training restarts rather than failing on it forever. True if it was set aside."""
    try:
        read_checkpoint(checkpoint)
        return False
    except ConfigError as e:
        aside = set_aside(checkpoint, "damaged")
        run_logger().warning(f"{e}: set aside as {aside.name}; training starts afresh")
        return True


def set_aside_stale_checkpoints(folder: Path) -> list[Path]:
    """Before a training starts afresh in `folder`: set aside the checkpoints an earlier attempt left there
    (`best.ckpt` and the like) as `<name>.stale-<time>`, so that evaluation never loads one of them."""
    stale = sorted(folder.glob("*.ckpt")) if folder.is_dir() else []
    for checkpoint in stale:
        set_aside(checkpoint, "stale")
    if stale:
        run_logger().warning(f"set aside {', '.join(c.name for c in stale)} of an earlier attempt in {folder}")
    return stale
