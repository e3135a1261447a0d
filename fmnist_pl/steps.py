"""How the pipeline's steps run on one machine, apart from Prefect's orchestration: a step's command in a
subprocess (its output to the step's log), the step folder (a lock, a record of a finished step only once its
outputs exist, a damaged checkpoint set aside), the order and thread budget of trainings that share the CPU, and
the run folder's records (`latest`, runs whose process died). `flows/full_pipeline.py` composes them into tasks.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from fmnist_pl import layout
from fmnist_pl.callbacks import EPOCH_LINE_PREFIX
from fmnist_pl.errors import ConfigError
from fmnist_pl.io import write_record_on_failure, write_text_atomic
from fmnist_pl.module import read_checkpoint


def step_key(**inputs: object) -> str:
    """A short hash of everything a step's result depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StepFailed(RuntimeError):
    """A step's command failed; the message names the command, its last line of output and its log file."""


class BadInputError(StepFailed):
    """The CLI rejected an option, the data, a checkpoint or the machine (exit code 2): retrying cannot help."""


STOPPING = threading.Event()  # set when a flow run stops or fails: waiting trainings give up instead of starting


def stopping() -> bool:
    """Whether the flow run in this process is stopping (a function, not the Event itself, for the flow file:
    `serve` pickles the flow's globals by value, and an Event holds a lock)."""
    return STOPPING.is_set()


def begin_run() -> None:
    """A new flow run in this process: whatever stopped an earlier one no longer applies."""
    STOPPING.clear()


RUNNING: dict = {}  # the flow run's record and its file, for a failure recorded from outside the flow (record_lost)


def track_run(record_file: Path, record: dict) -> None:
    """Remember the running flow's record (the same dict the flow updates), for `record_lost`."""
    RUNNING.update(file=record_file, record=record)


def record_lost(message: str) -> None:
    """Mark the running flow's record failed with `message`, from outside the flow (its server is gone)."""
    record = RUNNING.get("record")
    if record is not None and record.get("status") == "running":
        record.update(status="failed", error=message)
        write_record_on_failure(RUNNING["file"], json.dumps(record, indent=2) + "\n")


LIVE_CHILDREN: set[subprocess.Popen] = set()  # training subprocesses, stopped with the flow (stop_children)


def run_cli_subprocess(
    args: list[str], log_file: Path, env: dict[str, str] | None = None, launcher: str = "", keep_open: tuple = ()
) -> None:
    """Run `[launcher] python -m fmnist_pl ARGS` in its own process, its whole output into the step's log file
    and only its per-epoch lines to the flow's log (the console and the Prefect UI).

    A subprocess, because Lightning's DDP launcher re-runs the current command for every extra rank:
    inside the flow's process that command would be the whole flow. `launcher` (e.g. `srun`) starts the
    command once per task of a multi-node allocation, as Lightning's multi-node guide does.
    """
    logger = get_run_logger()
    command = [*shlex.split(launcher), sys.executable, "-m", "fmnist_pl", *args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if STOPPING.is_set():
        raise StepFailed("the pipeline is stopping")
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            # The step folder's lock travels with the command: if this flow is killed outright, a training that
            # outlives it still owns the folder, and the next run waits for it instead of training beside it.
            pass_fds=tuple(keep_open),
            # Ctrl-C in a terminal reaches the whole process group; the flow decides, and stops this training.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        LIVE_CHILDREN.add(process)
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if line.startswith(EPOCH_LINE_PREFIX):
                    logger.info(line.rstrip())
            process.wait()
        finally:
            LIVE_CHILDREN.discard(process)
            if process.poll() is None:  # the flow is stopping: do not leave a training running on its own
                stop_process_tree(process)
    if process.returncode != 0:
        last = next((line for line in reversed(log_file.read_text().splitlines()) if line.strip()), "")
        error = BadInputError if process.returncode == 2 else StepFailed
        raise error(f"`fmnist-pl {args[0]}` failed (exit code {process.returncode}): {last.strip()} [log: {log_file}]")


_one_output_capture = threading.Lock()  # sys.stdout is process-wide: one evaluation captures it at a time


@contextlib.contextmanager
def output_into(log_file: Path) -> Iterator[None]:
    """Send what an in-process CLI run prints (Lightning's start-up lines, its test table, warnings) to the step's
    log file alone, not to the console twice (once plain, once through Prefect's root handler)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    saved = [(lg.handlers, lg.propagate) for lg in loggers]
    with (
        _one_output_capture,
        open(log_file, "a") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        handler = logging.StreamHandler(log)
        for lg in loggers:
            lg.handlers, lg.propagate = [handler], False
        try:
            yield
        finally:
            for lg, (handlers, propagate) in zip(loggers, saved, strict=True):
                lg.handlers, lg.propagate = handlers, propagate


def log_into(folder: Path) -> list[str]:
    """CLI options that make a run write into exactly `folder` (CSVLogger's save_dir/name/version)."""
    return [f"--trainer.logger.init_args.save_dir={folder.parent}", "--trainer.logger.init_args.name=",
            f"--trainer.logger.init_args.version={folder.name}"]  # fmt: skip


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect task's or flow's logger; outside a run (helpers called directly), a plain logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fmnist_pl.pipeline")


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
                if STOPPING.is_set():
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


class TrainingQueue:
    """Trainings in their planned order, within a budget of threads (each training costs its thread count). The
    flow's task threads arrive in any order; ticket k starts only after every earlier ticket has started, been
    found cached, or failed."""

    def __init__(self, budget: int) -> None:
        self.budget, self.running, self.next, self.passed = budget, 0, 0, set()
        self.changed = threading.Condition()

    def pass_turn(self, ticket: int) -> None:
        """Ticket `ticket` needs no slot (its result is cached, or it failed): later tickets may go ahead."""
        with self.changed:
            self.passed.add(ticket)
            while self.next in self.passed:
                self.next += 1
            self.changed.notify_all()

    @contextlib.contextmanager
    def turn(self, ticket: int, threads: int = 1) -> Iterator[None]:
        with self.changed:  # a retried ticket (ticket < next) only waits for room in the budget
            while not ((self.running == 0 or self.running + threads <= self.budget) and ticket <= self.next):
                if STOPPING.is_set():
                    raise RuntimeError("the pipeline is stopping")
                self.changed.wait(timeout=1)
            self.running += threads
        self.pass_turn(ticket)
        try:
            yield
        finally:
            with self.changed:
                self.running -= threads
                self.changed.notify_all()


@functools.cache
def training_queue(flow_run_id: str, budget: int) -> TrainingQueue:
    """The queue a flow run's trainings share."""
    return TrainingQueue(budget)


def training_plan(profile_costs: dict[str, float], cores: int) -> dict[str, int]:
    """Threads per network for trainings that share `cores` CPU cores, and no more threads than cores run at once.

    A network's thread count depends on the profile's networks and the core count only, never on which of them or
    how many seeds a run trains: a convolution's floating-point sums depend on the number of threads (bn_cnn's
    validation loss after 30 steps: 0.53756 on 1 thread, 0.53587 on 2), so the same seed always trains on the same
    threads on the same machine, alone or beside others, and a cached step is the one a rerun would compute.
    The costliest runs first; two 2-thread bn_cnn trainings side by side on 2 cores took about 4.5 minutes per
    epoch each, against about 45 s for one alone, hence the budget.
    """
    return cpu_thread_shares(profile_costs, cores)


def cpu_thread_shares(costs: dict, cores: int) -> dict:
    """Threads per training when trainings share `cores`: one each, and the cores left over in proportion to cost,
    so that the costliest training does not end up alone on one core while the others sit idle."""
    total, spare = sum(costs.values()), cores - len(costs)
    if spare <= 0:  # no more cores than trainings: one each, and a clearly dominant training may use every core
        threads = dict.fromkeys(costs, 1)
        costliest = max(costs, key=costs.get)
        # FLOPs are a rough proxy (a dense layer's FLOP is cheaper on a CPU than a small convolution's), so only
        # a training estimated at most of the total work is worth oversubscribing the cores for.
        if costs[costliest] > 0.8 * total:
            threads[costliest] = cores
        return threads
    shares = {network: spare * cost / total for network, cost in costs.items()}
    threads = {network: 1 + int(share) for network, share in shares.items()}
    left = cores - sum(threads.values())  # whole cores still unassigned: to the largest remainders
    for network in sorted(shares, key=lambda n: shares[n] - int(shares[n]), reverse=True)[:left]:
        threads[network] += 1
    return threads


def new_run_dir(output_dir: Path) -> Path:
    """A fresh outputs/<run id>/, never an earlier run's."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = output_dir / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run folder in {output_dir}")


def point_latest_at(run_dir: Path) -> None:
    """`outputs/latest` -> this run: called once the run has completed, so `latest` is always a whole run."""
    latest = run_dir.parent / f".latest.{os.getpid()}"
    latest.unlink(missing_ok=True)
    latest.symlink_to(run_dir.name)
    os.replace(latest, run_dir.parent / layout.LATEST)  # atomic: never a moment without a `latest`


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        return True
    return True


def mark_dead_runs(output_dir: Path, by: Path) -> list[Path]:
    """Earlier runs on this machine whose record still says running but whose process is gone (killed, or the
    machine went down) are marked "killed", so that run.json tells the truth. Returns them."""
    dead = []
    for record_file in output_dir.glob(f"*/{layout.RunFolder(Path()).record.name}"):
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if (record.get("status") == "running" and record.get("host") == socket.gethostname()
                and isinstance(record.get("pid"), int) and not process_alive(record["pid"])):  # fmt: skip
            record.update(status="killed", ended=f"found without its process (PID {record['pid']}) by {by.name}")
            write_text_atomic(record_file, json.dumps(record, indent=2) + "\n")
            dead.append(record_file.parent)
    return dead


def link(link_path: Path, target: Path) -> None:
    """A relative symbolic link, so that outputs/ can be moved or archived whole and its links still resolve."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(os.path.relpath(target, link_path.parent))


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc; elsewhere none): launchers such as torchrun start their workers in
    sessions of their own, out of reach of a process-group kill."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_process_tree(process: subprocess.Popen) -> None:
    """Kill a step's subprocess and everything it started (DDP ranks, a launcher's workers). SIGKILL: Lightning
    catches SIGTERM and trains on; nothing is lost, the next run resumes from the last epoch's checkpoint."""
    for pid in [*descendants(process.pid), process.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()


def stop_children() -> None:
    """The flow is stopping (Prefect's SIGTERM handler, Ctrl-C, a failure): no training is left running on its
    own, none waiting starts, no step retries."""
    STOPPING.set()
    for process in list(LIVE_CHILDREN):
        stop_process_tree(process)
