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
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from fmnist_pl import __version__
from fmnist_pl.errors import ConfigError
from fmnist_pl.io import write_text_atomic
from fmnist_pl.module import read_checkpoint
from fmnist_pl.pipeline.processes import run_logger, stopping
from fmnist_pl.pipeline.settings import PipelineSettings


def step_key(**inputs: object) -> str:
    """A short hash of everything a step's result depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def training_key(network: str, seed: int, settings: PipelineSettings, data: dict, threads: int | None) -> str:
    """A training step's cache key: what decides its result. The options (less the data's folder: its checksums
    stand in), the seed, the config's text, the code's version and the CPU threads (they change a convolution's
    sums). The launcher changes how, not what."""
    return step_key(step="train", network=network, seed=seed, config=settings.config_file(network).read_text(),
                    data=data["sha256"], version=__version__, options=settings.cli_options(data_dir=None),
                    threads=threads)  # fmt: skip


def evaluation_key(training_dir: str, data: dict, training_split: bool) -> str:
    """An evaluation step's cache key: the training it evaluates, the data, the code, and whether it predicts the
    training split too."""
    return step_key(step="evaluate", train=training_dir, data=data["sha256"], version=__version__,
                    training_split=training_split)  # fmt: skip


def reuse_finished(work: Path, what: str) -> dict | None:
    """A finished step's recorded result, if `work` holds one."""
    done = work / "done.json"
    if not done.is_file():
        return None
    run_logger().info(f"reusing finished {what} {work}")
    return {**json.loads(done.read_text()), "cached": True}


def mark_finished(work: Path, result: dict, outputs: list[Path]) -> dict:
    """Record a step's result in its folder, from then on reused; only when every output it promises exists."""
    missing = [str(path.relative_to(work)) for path in outputs if not path.is_file()]
    if missing:
        raise RuntimeError(f"{work.name} ended without writing {', '.join(missing)}; see its log in {work}")
    write_text_atomic(work / "done.json", json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}


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
