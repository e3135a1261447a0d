"""The pipeline's child processes: every step runs the `fmnist-pl` command in a subprocess of its own (its whole
output into the step's log, its per-epoch lines to the flow's log), and a stopping flow stops them all.

A subprocess, because Lightning's DDP launcher re-runs the current command for every extra rank: inside the flow's
process that command would be the whole flow. It also keeps a step's prints, warnings and process-wide state
(seeds, warning filters) out of the flow.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from fmnist_pl.layout import EPOCH_LINE_PREFIX

if TYPE_CHECKING:
    from fmnist_pl.pipeline.run_record import RunRecord
    from fmnist_pl.pipeline.scheduling import TrainingQueue


class StepFailed(RuntimeError):
    """A step's command failed; the message names the command, its last line of output and its log file."""


class BadInputError(StepFailed):
    """The CLI rejected an option, the data, a checkpoint or the machine (exit code 2): retrying cannot help."""


@dataclasses.dataclass
class RunContext:
    """What the flow run in this process shares among its task threads, and what reaches it from outside them (a
    signal handler, the server watch, a Dask client stopping its workers): whether it is stopping (waiting
    trainings then give up instead of starting), its live step subprocesses, its run.json and its training queue
    (the local runner's). One at a time: begin_run() starts the next."""

    stopping: threading.Event = dataclasses.field(default_factory=threading.Event)
    children: set[subprocess.Popen] = dataclasses.field(default_factory=set)
    record: RunRecord | None = None
    queue: TrainingQueue | None = None


_run = RunContext()


def current_run() -> RunContext:
    """The context of the flow run in this process (on a Dask worker: of the run whose steps it runs)."""
    return _run


def begin_run() -> None:
    """A new flow run in this process: whatever stopped an earlier one no longer applies."""
    global _run
    _run = RunContext()


def allow_steps() -> None:
    """On a Dask worker, as a run begins: an earlier run's stop no longer holds back steps. The steps it is running
    (another flow's, into the same cluster) stay tracked, so that their flow can still stop them."""
    _run.stopping.clear()


def stopping() -> bool:
    """Whether the flow run in this process is stopping."""
    return _run.stopping.is_set()


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The current Prefect task's or flow's logger; outside a run (helpers called directly), a plain logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("fmnist_pl.pipeline")


def log_into(folder: Path) -> list[str]:
    """CLI options that make a run write into exactly `folder` (CSVLogger's save_dir/name/version)."""
    return [
        f"--trainer.logger.init_args.save_dir={folder.parent}",
        "--trainer.logger.init_args.name=",
        f"--trainer.logger.init_args.version={folder.name}",
    ]


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")  # what torch's math obeys


def in_dask_worker() -> bool:
    """Whether this process is a Dask worker's."""
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def step_environment(threads: int | None) -> dict[str, str]:
    """A step command's environment: `threads` for every math library torch may use; with none planned (GPUs,
    several devices), the machine's defaults. Never what Dask's nanny sets on its worker processes for small
    Python tasks (`distributed.nanny.pre-spawn-environ`): inherited, its one-thread caps and its
    `MALLOC_TRIM_THRESHOLD_=65536` (which ends glibc's reuse of freed tensor memory: 616 s of system time against
    44) made bn_cnn's run 2.05x slower on a Dask worker than in the flow's process (benchmarks/README.md)."""
    environment = dict(os.environ)
    if in_dask_worker():
        import dask

        for name in dask.config.get("distributed.nanny.pre-spawn-environ", {}):
            environment.pop(name, None)
    if threads:
        environment.update(dict.fromkeys(THREAD_VARIABLES, str(threads)))
    return environment


def die_with_parent(signum: int) -> None:
    """In a child process before it runs: the kernel sends it `signum` when its parent dies (Linux; elsewhere a
    no-op)."""
    PR_SET_PDEATHSIG = 1  # linux/prctl.h
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signum)


def prepare_step_process(on_dask_worker: bool) -> None:
    """In a step's process before it runs: Ctrl-C in a terminal reaches the whole process group, and the flow
    decides, then stops this command. On a Dask worker the command also dies with the worker: a worker killed
    outright has its step retried on another, which resumes from the last checkpoint once this one no longer holds
    the step's lock. (In the flow's own process a training outlives a killed flow, and the next run waits for it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if on_dask_worker:
        die_with_parent(signal.SIGKILL)


def run_step_command(
    args: list[str], log_file: Path, threads: int | None = None, launcher: str = "", keep_open: tuple = ()
) -> None:
    """Run `[launcher] python -m fmnist_pl ARGS` in its own process; raise StepFailed (BadInputError for exit
    code 2) naming its last line and log. `launcher` (e.g. `srun`) starts the command once per task of a
    multi-node allocation, as Lightning's multi-node guide does."""
    logger = run_logger()
    command = [*shlex.split(launcher), sys.executable, "-m", "fmnist_pl", *args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    run = current_run()
    if run.stopping.is_set():
        raise StepFailed("the pipeline is stopping")
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=step_environment(threads),
            # The step folder's lock travels with the command: if this flow is killed outright, a training that
            # outlives it still owns the folder, and the next run waits for it instead of training beside it.
            pass_fds=tuple(keep_open),
            preexec_fn=functools.partial(prepare_step_process, on_dask_worker=in_dask_worker()),
        )
        run.children.add(process)
        try:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if line.startswith(EPOCH_LINE_PREFIX):
                    logger.info(line.rstrip())
            process.wait()
        finally:
            run.children.discard(process)
            if process.poll() is None:  # the flow is stopping: do not leave a training running on its own
                stop_process_tree(process)
    if process.returncode != 0:
        last = next((line for line in reversed(log_file.read_text().splitlines()) if line.strip()), "")
        error = BadInputError if process.returncode == 2 else StepFailed
        raise error(f"`fmnist-pl {args[0]}` failed (exit code {process.returncode}): {last.strip()} [log: {log_file}]")


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (none once it has exited): launchers such as torchrun start their workers in
    sessions of their own, out of reach of a process-group kill."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


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
    run = current_run()
    run.stopping.set()
    for process in list(run.children):
        stop_process_tree(process)
