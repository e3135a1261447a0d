"""The fmnist-pl pipeline as a Prefect flow: download → train every network → evaluate each → comparison report.

    python flows/full_pipeline.py                         # one run, no Prefect server needed
    python flows/full_pipeline.py --help                  # every option (fmnist_pl/settings.py declares them)
    python flows/full_pipeline.py serve --cron "0 3 * * *"  # a scheduled deployment, shown in the Prefect UI

Every step is a retryable task that passes file paths, not tensors. Training and evaluation run the same
`fmnist-pl` CLI a user runs by hand. Finished steps are cached under <output dir>/steps/, keyed on the exact CLI
options, config file and data checksums; an interrupted training step resumes from its last checkpoint.
"""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from the real annotations,
# and a served run cannot resolve them from strings.
import argparse
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

import pydantic
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)
from prefect.tasks import exponential_backoff

from fmnist_pl import __version__, layout
from fmnist_pl.callbacks import EPOCH_LINE_PREFIX, forward_flops
from fmnist_pl.cli import USER_ERRORS, quiet_known_warnings, run_cli
from fmnist_pl.data import load_dataset
from fmnist_pl.errors import ConfigError, DownloadError
from fmnist_pl.io import write_text_atomic
from fmnist_pl.module import read_checkpoint
from fmnist_pl.networks import NETWORKS
from fmnist_pl.report import build_report, markdown_with_embedded_figures
from fmnist_pl.settings import PipelineSettings, add_settings_arguments, profile_config


def step_key(**inputs: object) -> str:
    """A short hash of everything a step's result depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


class StepFailed(RuntimeError):
    """A step's command failed; the message names the command, its last line of output and its log file."""


class BadInputError(StepFailed):
    """The CLI rejected an option, the data, a checkpoint or the machine (exit code 2): retrying cannot help."""


STOPPING = threading.Event()  # set when a flow run stops or fails: waiting trainings give up instead of starting


def retry_unless_bad_input(task, task_run, state) -> bool:  # noqa: ANN001
    """Prefect retry condition: retry what may pass on a second try (a download, a killed or crashed subprocess),
    never a rejected option, data file, checkpoint or machine."""
    if STOPPING.is_set():  # the flow was told to stop: no second attempt
        return False
    try:
        state.result()
    except DownloadError:
        return True
    except (BadInputError, *USER_ERRORS):
        return False
    except Exception:
        return True
    return True


LIVE_CHILDREN: set[subprocess.Popen] = set()  # training subprocesses, stopped with the flow (see stop_on_signal)


def run_cli_subprocess(args: list[str], log_file: Path, env: dict[str, str] | None = None, launcher: str = "") -> None:
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
        process = subprocess.Popen(  # its own process group: stopping it stops its DDP ranks too
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            start_new_session=True,
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
                stop_process_group(process)
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
def step_lock(work: Path) -> Iterator[None]:
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
        yield


def set_aside_if_damaged(checkpoint: Path) -> bool:
    """A last.ckpt that cannot be read (a crash mid-write on a filesystem without atomic rename, a full disk) is
    renamed and logged, so that training restarts rather than failing on it forever. True if it was set aside."""
    try:
        read_checkpoint(checkpoint)
        return False
    except ConfigError as e:
        aside = checkpoint.with_name(f"{checkpoint.name}.damaged-{datetime.now():%Y%m%d-%H%M%S}")
        checkpoint.rename(aside)
        run_logger().warning(f"{e}: set aside as {aside.name}; training starts afresh")
        return True


def network_config(settings: PipelineSettings, network: str) -> Path:
    """The packaged config of `network` in the run's profile."""
    config = profile_config(settings.profile, network)
    if config is None:
        raise ConfigError(f"profile {settings.profile!r} has no config for network {network!r}; choose other --models")
    return config


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=retry_unless_bad_input, task_run_name="download")
def download_data(data_dir: str | None, require_official: bool) -> dict:
    """Find or download Fashion-MNIST, verify it and cache the decoded tensors; return its folder and checksums."""
    started = time.perf_counter()
    tensors = load_dataset(data_dir, require_official=require_official)  # what the data module's prepare_data runs
    get_run_logger().info(f"Fashion-MNIST from {tensors.source_dir}, verified")
    return {
        "source_dir": tensors.source_dir,
        "sha256": tensors.sha256,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


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


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_condition_fn=retry_unless_bad_input,
    task_run_name="train-{network}-seed{seed}",
)
def train_model(
    network: str, seed: int, settings: PipelineSettings, data: dict, steps_dir: str, threads: int | None = None,
    budget: int = 1, ticket: int = 0,
) -> dict:  # fmt: skip
    """`fmnist-pl fit` for one network and seed; cached on its inputs, resumed from last.ckpt after an interruption."""
    queue = training_queue(str(flow_run.id), budget)
    try:
        return _train(network, seed, settings, data, steps_dir, threads, queue, ticket)
    finally:
        queue.pass_turn(ticket)  # whatever happened, later trainings are not held up


def _train(network: str, seed: int, settings: PipelineSettings, data: dict, steps_dir: str, threads: int | None,
           queue: TrainingQueue, ticket: int) -> dict:  # fmt: skip
    logger = get_run_logger()
    config = network_config(settings, network)
    # The key holds what decides the result: the options (less the data's folder: its checksums stand in),
    # the seed, the config's text and the code's version. Thread counts and the launcher change how, not what.
    key = step_key(step="train", network=network, seed=seed, config=config.read_text(), data=data["sha256"],
                   version=__version__, options=settings.cli_options(data_dir=None))  # fmt: skip
    work = layout.TrainingFolder(layout.step_folder(Path(steps_dir), "train", network, seed, key))
    if finished := reuse_finished(work.path, f"{network} seed {seed} training"):
        return finished
    with queue.turn(ticket, threads or 1), step_lock(work.path):  # its threads, in the planned order; its folder
        if finished := reuse_finished(work.path, f"{network} seed {seed} training"):  # another run finished it
            return finished
        resume = work.last_checkpoint.is_file() and not set_aside_if_damaged(work.last_checkpoint)
        logger.info(f"training{' (resuming)' if resume else ''}{f' on {threads} thread(s)' if threads else ''}; "
                    f"log: {work.log}")  # fmt: skip
        started = time.perf_counter()
        run_cli_subprocess(
            ["fit", f"--config={config}", *settings.cli_options(data_dir=data["source_dir"]), f"--seed_everything={seed}",
             *log_into(work.path), "--trainer.enable_progress_bar=false",
             *([f"--ckpt_path={work.last_checkpoint}"] if resume else [])],
            work.log,
            env={"OMP_NUM_THREADS": str(threads)} if threads else None,
            launcher=settings.train_launcher or "",
        )  # fmt: skip
        result = {
            "network": network,
            "seed": seed,
            "dir": str(work.path),
            "wall_seconds": round(time.perf_counter() - started, 2),
            "resumed": resume,
        }
        return mark_finished(work.path, result, [work.best_checkpoint, work.last_checkpoint, work.history])


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=retry_unless_bad_input,
    task_run_name="evaluate-{network}-seed{seed}",
)
def evaluate_model(
    network: str, seed: int, trained: dict, settings: PipelineSettings, data: dict, steps_dir: str
) -> dict:
    """`fmnist-pl test` on the best checkpoint, and `predict` on the test and training splits (for the report)."""
    config = network_config(settings, network)
    key = step_key(step="evaluate", train=trained["dir"], data=data["sha256"], version=__version__)
    work = layout.EvaluationFolder(layout.step_folder(Path(steps_dir), "evaluate", network, seed, key))
    if finished := reuse_finished(work.path, f"{network} seed {seed} evaluation"):
        return finished
    with step_lock(work.path):
        if finished := reuse_finished(work.path, f"{network} seed {seed} evaluation"):
            return finished
        get_run_logger().info(f"evaluating; log: {work.log}")
        best = layout.TrainingFolder(Path(trained["dir"])).best_checkpoint
        one_device = settings.cli_options(data_dir=data["source_dir"], devices=1, strategy="auto", num_nodes=1)
        common = [f"--config={config}", f"--ckpt_path={best}", *one_device, f"--seed_everything={seed}",
                  "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
        started = time.perf_counter()
        # In this process (one device, so no DDP launcher is involved): saves three interpreter start-ups.
        with output_into(work.log):
            run_cli(["test", *common, *log_into(work.test)])
            for split in ("test", "train"):
                run_cli(["predict", *common, f"--data.predict_split={split}", *log_into(work.predict(split))])
        result = {"network": network, "seed": seed, "dir": str(work.path), "train_dir": trained["dir"],
                  "wall_seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
        return mark_finished(work.path, result, [work.test_metrics, work.confusion_test,
                                                 work.predictions("test"), work.predictions("train")])  # fmt: skip


@task(retries=1, task_run_name="report")
def write_report(run_dir: str) -> dict:
    """Build the comparison report from the run folder's files and publish it as Prefect artifacts."""
    started = time.perf_counter()
    run = layout.RunFolder(Path(run_dir))
    summary = build_report(run.path)
    create_markdown_artifact(  # figures inlined: the UI cannot see the run folder's files
        markdown=markdown_with_embedded_figures(run.path),
        key="fmnist-report",
        description="fmnist-pl comparison report",
    )
    create_table_artifact(table=summary["table"], key="fmnist-results", description="Test accuracy per network")
    return {"report": str(run.report(".md")), "wall_seconds": round(time.perf_counter() - started, 2)}


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice resolves to the CPU on this machine."""
    import torch

    return accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )


def training_cost(settings: PipelineSettings, network: str) -> float:
    """A training's relative CPU cost: forward FLOPs per image × epochs (every network sees the same images)."""
    config = yaml.safe_load(network_config(settings, network).read_text())
    epochs = settings.epochs or config.get("trainer", {}).get("max_epochs", 1)
    return forward_flops(NETWORKS[network]()) * epochs


def training_plan(costs: dict[str, float], seeds: list[int], cores: int) -> tuple[int, dict[tuple[str, int], int]]:
    """(thread budget, threads per (network, seed)) for trainings that share `cores` CPU cores.

    All at once when there are no more trainings than cores. Otherwise as one seed's networks would run side by
    side (threads split by cost among them, as many trainings as there are cores or networks): that many threads
    run at once, so later seeds start as earlier trainings free their threads.
    """
    trainings = [(network, seed) for seed in seeds for network in costs]
    if len(trainings) <= cores:
        threads = cpu_thread_shares({t: costs[t[0]] for t in trainings}, cores)
        return sum(threads.values()), threads
    wave = cpu_thread_shares({t: costs[t[0]] for t in trainings[: max(cores, len(costs))]}, cores)
    per_network = {network: min(n for (m, _), n in wave.items() if m == network) for network in costs}
    return sum(wave.values()), {(network, seed): per_network[network] for network, seed in trainings}


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


@flow(name="fmnist-full-pipeline", log_prints=True)
def full_pipeline(settings: PipelineSettings = PipelineSettings()) -> str:  # noqa: B008 - immutable, shown in the UI
    """Download → train → evaluate → report; returns the run folder."""
    settings.check_hardware()  # also where a served run lands: the worker's machine decides
    STOPPING.clear()  # a new run in this process (an earlier one may have stopped)
    networks = settings.networks()
    configs = {network: network_config(settings, network) for network in networks}  # fails before any work
    output = Path(settings.output_dir).resolve()
    run = layout.RunFolder(new_run_dir(output))
    for dead in mark_dead_runs(output, by=run.path):
        get_run_logger().warning(f"run {dead.name} was killed before it finished: marked as such in its run.json")
    steps_dir = str(output / layout.STEPS_DIR)
    record = {
        "run_dir": str(run.path),
        "status": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "networks": networks,
        "seeds": settings.seeds,
        "settings": settings.model_dump(),
        "configs": {network: str(config) for network, config in configs.items()},
        "steps": {},
        "started": datetime.now().isoformat(),
    }
    write_text_atomic(run.record, json.dumps(record, indent=2) + "\n")
    print(f"fmnist-pl pipeline: run folder {run.path}")

    def finish(step: str, future):  # noqa: ANN001, ANN202
        """The step's result, recording in run.json which step failed and why if it did."""
        try:
            result = future.result() if hasattr(future, "result") else future
        except Exception as e:
            record.update(status="failed", failed_step=step, error=f"{type(e).__name__}: {e}")
            write_text_atomic(run.record, json.dumps(record, indent=2) + "\n")
            raise
        record["steps"][step] = result
        write_text_atomic(run.record, json.dumps(record, indent=2) + "\n")
        return result

    try:
        data = finish("download", download_data.submit(settings.data_dir, settings.require_official))
        # Costliest network first within each seed: the longest training starts first and sets the pace.
        costs = dict(sorted(((n, training_cost(settings, n)) for n in networks), key=lambda item: -item[1]))
        budget, threads = len(networks) * len(settings.seeds), {}
        if on_cpu(settings.accelerator) and settings.devices in ("auto", "1"):
            # Independent trainings on CPU: each its share of the cores, rather than all of them oversubscribing
            # every core, and no more threads at once than the plan allows.
            budget, threads = training_plan(costs, settings.seeds, os.cpu_count() or 1)
        runs = [(network, seed) for seed in settings.seeds for network in costs]
        trainings = {(n, s): train_model.submit(n, s, settings, data, steps_dir, threads.get((n, s)), budget, ticket)
                     for ticket, (n, s) in enumerate(runs)}  # fmt: skip
        evaluations = {(n, s): evaluate_model.submit(n, s, trainings[n, s], settings, data, steps_dir) for n, s in runs}
        trained = {(n, s): finish(layout.step_name("train", n, s), trainings[n, s]) for n, s in runs}
        evaluated = {(n, s): finish(layout.step_name("evaluate", n, s), evaluations[n, s]) for n, s in runs}
        for network, seed in runs:  # the run folder shows each training's step folders, which stay shared and cached
            link(run.training(network, seed).path, Path(trained[network, seed]["dir"]))
            link(run.evaluation(network, seed).path, Path(evaluated[network, seed]["dir"]))
        finish("report", write_report.submit(str(run.path)))
    except BaseException as e:  # stopped (SIGTERM, Ctrl-C) or failed: stop every training, and say so
        stop_children()
        if record["status"] == "running":
            record.update(status="stopped", error=f"{type(e).__name__}: {e}")
            write_text_atomic(run.record, json.dumps(record, indent=2) + "\n")
        raise
    record.update(status="completed", finished=datetime.now().isoformat())
    write_text_atomic(run.record, json.dumps(record, indent=2) + "\n")
    point_latest_at(run.path)
    print(f"fmnist-pl pipeline: done, report at {run.report('.md')}")
    return str(run.path)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with the error first and a hint after it instead of the whole usage before it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(`python flows/full_pipeline.py --help` lists every option)\n")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PipelineSettings]:
    """The command line: `run` (default) or `serve`, and one option per PipelineSettings field."""
    parser = OneLineErrorParser(
        description="Train, evaluate and compare the study's networks and a modern small CNN on Fashion-MNIST.",
        epilog="`serve --cron EXPR` registers a scheduled deployment instead of running once.",
    )
    parser.add_argument(
        "command", nargs="?", choices=["run", "serve"], default="run", help="run once (default) or serve"
    )
    add_settings_arguments(parser)
    parser.add_argument("--cron", help="with serve: the schedule, e.g. '0 3 * * *'")
    parser.add_argument("--name", default="fmnist-full-pipeline", help="with serve: the deployment's name")
    args = parser.parse_args(argv)
    if args.command == "serve" and not args.cron:
        parser.error("serve needs --cron, e.g. --cron '0 3 * * *'")
    # Bad settings end here, in one line, before Prefect's server starts or anything trains.
    try:
        settings = PipelineSettings(**{name: getattr(args, name) for name in PipelineSettings.model_fields})
        for network in settings.networks():
            network_config(settings, network)
        settings.check_hardware()
    except pydantic.ValidationError as e:
        parser.error("; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" for err in e.errors()))
    except ConfigError as e:
        parser.error(str(e))
    return args, settings


def prefect_defaults() -> dict:
    """Settings for Prefect's temporary local server, where the user has not set them."""
    defaults = {
        # Analytics race the temporary server's fresh database and print a `database is locked` traceback.
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        # The default 20 s start-up limit is too short for a busy 2-core laptop.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120,
    }
    return {setting: value for setting, value in defaults.items() if setting.name not in os.environ}


class OneLineFailures(logging.Filter):
    """Prefect logs a failed step's traceback, and the flow's again. For a failure whose message already says
    what went wrong and where its log is (a rejected option, bad data, a damaged checkpoint, a failed command),
    that is a wall of lines around one sentence: keep the sentence. Other errors (bugs) keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (*USER_ERRORS, StepFailed)):
            if record.getMessage().startswith("Encountered exception during execution"):
                return False  # the flow repeating its failed step's error: the step has said it
        if record.name == "prefect.flow_runs" and record.getMessage().startswith("Finished in state Failed("):
            return False  # main() ends with the reason in one line; the UI shows the flow's state anyway
        if record.getMessage().startswith("Finished in state NotReady("):
            return False  # a step that never started because the one before it failed: said already
            record.exc_info, record.exc_text = None, None
        return True


def stop_process_group(process: subprocess.Popen) -> None:
    """Kill a step's subprocess and everything it started (DDP ranks). SIGKILL: Lightning catches SIGTERM and trains
    on; nothing is lost, the next run resumes from the last epoch's checkpoint."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def stop_children() -> None:
    """The flow is stopping (Prefect's SIGTERM handler, Ctrl-C, a failure): no training is left running on its
    own, none waiting starts, no step retries."""
    STOPPING.set()
    for process in list(LIVE_CHILDREN):
        stop_process_group(process)


def stop_on_signal(signum: int, frame: object) -> None:
    """`kill <flow PID>` outside a flow run (Prefect handles SIGTERM inside one): leave through the normal exit
    path, so that Prefect's temporary server is stopped too instead of orphaned."""
    stop_children()
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python flows/full_pipeline.py`."""
    quiet_known_warnings()
    args, settings = parse_args(argv)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(OneLineFailures())
    signal.signal(signal.SIGTERM, stop_on_signal)
    with temporary_settings(updates=prefect_defaults()):
        if args.command == "serve":
            full_pipeline.serve(name=args.name, cron=args.cron, parameters={"settings": settings.model_dump()})
            return
        try:
            run_dir = Path(full_pipeline(settings))
        except Exception as e:  # Prefect has logged what it needs to; end with the one line that matters
            permanent = isinstance(e, (*USER_ERRORS, BadInputError))
            print(f"fmnist-pl pipeline failed: {e}", file=sys.stderr)
            sys.exit(2 if permanent else 1)
    print(results_table(json.loads(layout.RunFolder(run_dir).summary.read_text())))
    print(f"report: {layout.RunFolder(run_dir).report('.html')}")


def results_table(summary: dict) -> str:
    """The console's closing table: per network, its seeds, test accuracy and training time."""
    rows = [("network", "seeds", "test accuracy (mean ± sd, min-max)", "training time (mean)")]
    for network, r in summary["networks"].items():
        accuracy = r["test_accuracy"]
        std = f" ± {accuracy['std'] * 100:.2f}" if accuracy["std"] is not None else ""
        rows.append((network, ",".join(map(str, summary["seeds"])),
                     f"{accuracy['mean']:.2%}{std} ({accuracy['min']:.2%}-{accuracy['max']:.2%})",
                     f"{r['training_wall_seconds']['mean']:.0f} s"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


if __name__ == "__main__":
    main()
