"""The pipeline's steps as Prefect tasks: download, train, evaluate, report. Each passes file paths, not tensors;
training and evaluation run the `fmnist-pl` command a user runs by hand, in a subprocess, into a cached step
folder (step_cache.py)."""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import IO

from prefect import Task, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.client.schemas.objects import State, TaskRun
from prefect.tasks import exponential_backoff

from fmnist_pl import layout
from fmnist_pl.errors import USER_ERRORS, DownloadError
from fmnist_pl.fashion_mnist import load_dataset
from fmnist_pl.io import naming_place, place_error
from fmnist_pl.pipeline.processes import BadInputError, current_run, log_into, run_step_command, stopping
from fmnist_pl.pipeline.run_record import DataRecord, StepResult
from fmnist_pl.pipeline.settings import PipelineSettings, options
from fmnist_pl.pipeline.step_cache import (
    evaluation_key,
    export_key,
    mark_finished,
    reuse_finished,
    set_aside_if_damaged,
    set_aside_stale_checkpoints,
    step_lock,
    training_key,
)
from fmnist_pl.report import build_report, markdown_with_embedded_figures


def retry_unless_bad_input(task: Task, task_run: TaskRun, state: State) -> bool:
    """Prefect retry condition: retry what may pass on a second try (a download, a killed or crashed subprocess),
    never a rejected option, data file, checkpoint or machine."""
    if stopping():  # the flow was told to stop: no second attempt
        return False
    try:
        state.result()
    except DownloadError:
        return True
    except (BadInputError, *USER_ERRORS):
        return False
    except OSError as e:  # a full disk or a read-only folder stays so on a second try
        return place_error(e) is None
    except Exception:
        return True
    return True


def this_worker() -> dict:
    """Where a step ran: the host and the process (the flow's own, or a Dask worker's)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def worker_words() -> str:
    worker = this_worker()
    return f"on {worker['host']} (process {worker['pid']})"


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=retry_unless_bad_input, task_run_name="download")
def download_data(data_dir: str | None, require_official: bool) -> DataRecord:
    """Find or download Fashion-MNIST, verify it and cache the decoded tensors; return its folder and checksums."""
    started = time.perf_counter()
    tensors = load_dataset(data_dir, require_official=require_official, option="--data-dir")  # as prepare_data
    get_run_logger().info(f"Fashion-MNIST from {tensors.source_dir}, verified")
    return DataRecord(
        source_dir=tensors.source_dir,
        sha256={**tensors.sha256, "decoded": tensors.digest()},
        wall_seconds=round(time.perf_counter() - started, 2),
    )


def fit_options(settings: PipelineSettings) -> list[str]:
    """The `fmnist-pl fit` options a training step's settings become (its cache key holds them too)."""
    return options(
        ("--trainer.max_epochs", settings.epochs),
        ("--data.batch_size", settings.batch_size),
        ("--data.val_size", settings.val_size),
        ("--trainer.accelerator", settings.accelerator),
        ("--trainer.devices", settings.devices),
        ("--trainer.strategy", settings.strategy),
        ("--trainer.num_nodes", settings.num_nodes),
        ("--data.require_official", settings.require_official),
    )


def step_task(run_name: str, backoff_seconds: float) -> Callable[[Callable], Task]:
    """A training or evaluation task: retried twice, after `backoff_seconds` then more, unless a retry cannot help."""
    return task(
        retries=2,
        retry_delay_seconds=exponential_backoff(backoff_factor=backoff_seconds),
        retry_condition_fn=retry_unless_bad_input,
        task_run_name=run_name,
    )


def cached_step(
    work: Path, what: str, outputs: list[Path], run: Callable[[IO], dict], turn: ContextManager | None = None
) -> StepResult:
    """A step's recorded result if its folder `work` holds a finished one; else, in its turn and owning the folder,
    `run(lock)`'s (the step's own result fields; `lock` travels with a command that outlives the flow), recorded."""
    if finished := reuse_finished(work, what, outputs):
        return finished
    with turn or contextlib.nullcontext(), step_lock(work) as lock, naming_place(work):
        if finished := reuse_finished(work, what, outputs):  # another run finished it meanwhile
            return finished
        started = time.perf_counter()
        fields = run(lock)
        result = StepResult(
            dir=str(work), wall_seconds=round(time.perf_counter() - started, 2), worker=this_worker(), **fields
        )
        return mark_finished(work, result, outputs)


def fit_into(
    work: layout.TrainingFolder,
    config: Path,
    fit: list[str],
    seed: int,
    data: DataRecord,
    lock: IO,
    threads: int | None = None,
    launcher: str | None = None,
) -> bool:
    """`fmnist-pl fit --config CONFIG FIT...` into a training step's folder, from its last.ckpt if an interrupted
    attempt left one (a damaged one is set aside); True if it resumed. `lock` travels with the command."""
    resume = work.last_checkpoint.is_file() and not set_aside_if_damaged(work.last_checkpoint)
    if not resume:  # an earlier attempt's best.ckpt must never be what this training's evaluation loads
        set_aside_stale_checkpoints(work.best_checkpoint.parent)
    get_run_logger().info(
        f"training{' (resuming)' if resume else ''}{f' on {threads} thread(s)' if threads else ''} "
        f"{worker_words()}; log: {work.log}"
    )
    run_step_command(
        [
            "fit",
            f"--config={config}",
            *fit,
            f"--data.data_dir={data.source_dir}",
            f"--seed_everything={seed}",
            *log_into(work.path),
            "--trainer.enable_progress_bar=false",
            *([f"--ckpt_path={work.last_checkpoint}"] if resume else []),
        ],
        work.log,
        threads=threads,
        launcher=launcher or "",
        keep_open=(lock.fileno(),),
    )
    return resume


@step_task("train-{network}-seed{seed}", backoff_seconds=10)
def train_model(
    network: str,
    seed: int,
    settings: PipelineSettings,
    data: DataRecord,
    steps_dir: str,
    threads: int | None = None,
    ticket: int = 0,
    config: str | None = None,
) -> StepResult:
    """`fmnist-pl fit` for one network and seed; cached on its inputs, resumed from last.ckpt after an interruption.
    On the local runner trainings start in `ticket` order within the run's thread budget (scheduling.py); on a
    Dask worker, which has no queue, the cluster's scheduler decides. `config`: another config file than the
    profile's (a sweep's best.yaml)."""
    queue = current_run().queue
    fit = fit_options(settings)
    config_file = Path(config) if config else settings.config_file(network)
    key = training_key(network, seed, config_file, fit, data, threads)
    work = layout.TrainingFolder(layout.step_folder(Path(steps_dir), "train", network, seed, key))

    def train(lock: IO) -> dict:
        resumed = fit_into(work, config_file, fit, seed, data, lock, threads, settings.train_launcher)
        return {"network": network, "seed": seed, "resumed": resumed}

    outputs = [work.best_checkpoint, work.last_checkpoint, work.history]
    try:
        turn = queue.turn(ticket, threads or 1) if queue else None
        return cached_step(work.path, f"{network} seed {seed} training", outputs, train, turn)
    finally:
        if queue:
            queue.pass_turn(ticket)  # whatever happened, later trainings are not held up


@step_task("evaluate-{network}-seed{seed}", backoff_seconds=5)
def evaluate_model(
    network: str,
    seed: int,
    trained: StepResult,
    settings: PipelineSettings,
    data: DataRecord,
    steps_dir: str,
    config: str | None = None,
) -> StepResult:
    """`fmnist-pl evaluate` on the best checkpoint: test metrics and predictions, and for the run's first seed the
    training split's predictions too (the report shows the first seed's training-set confusion matrix only).
    `config`: the training's, where it was not the profile's."""
    training_split = seed == settings.seeds[0]
    best = layout.TrainingFolder(Path(trained.dir)).best_checkpoint  # where the training is now, moved or not
    key = evaluation_key(best, data, training_split)
    work = layout.EvaluationFolder(layout.step_folder(Path(steps_dir), "evaluate", network, seed, key))

    def evaluate(lock: IO) -> dict:
        get_run_logger().info(f"evaluating {worker_words()}; log: {work.log}")
        run_step_command(
            [
                "evaluate",
                f"--config={config or settings.config_file(network)}",
                f"--ckpt_path={best}",
                # What decides a test result besides the checkpoint: the data, its split, the accelerator; on one
                # device, since DDP would pad the test set to a multiple of the ranks.
                f"--data.data_dir={data.source_dir}",
                *options(
                    ("--data.val_size", settings.val_size), ("--data.require_official", settings.require_official)
                ),
                f"--trainer.accelerator={settings.accelerator}",
                "--trainer.devices=1",
                f"--seed_everything={seed}",
                f"--predict_splits=[{'train' if training_split else ''}]",
                *log_into(work.path),
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
            ],
            work.log,
        )
        # The training by its folder's name: both live in the same steps folder, wherever it is moved.
        return {"network": network, "seed": seed, "train_dir": Path(trained.dir).name}

    outputs = [work.test_metrics, work.confusion_test, work.predictions("test")]
    outputs += [work.predictions("train")] * training_split
    return cached_step(work.path, f"{network} seed {seed} evaluation", outputs, evaluate)


@step_task("export-{network}-seed{seed}", backoff_seconds=5)
def export_model(
    network: str, seed: int, trained: StepResult, settings: PipelineSettings, data: DataRecord, steps_dir: str
) -> StepResult:
    """`fmnist-pl export` of a training's best checkpoint: model.onnx (checked against PyTorch on the test set),
    model.json and the model card."""
    best = layout.TrainingFolder(Path(trained.dir)).best_checkpoint
    work = layout.step_folder(Path(steps_dir), "export", network, seed, export_key(best, data))
    log = work / "export.log"

    def export(lock: IO) -> dict:
        get_run_logger().info(f"exporting to ONNX {worker_words()}; log: {log}")
        run_step_command(
            [
                "export",
                f"--ckpt_path={best}",
                f"--output_dir={work}",
                f"--data.data_dir={data.source_dir}",
                *options(("--data.require_official", settings.require_official)),
            ],
            log,
        )
        return {"network": network, "seed": seed, "train_dir": Path(trained.dir).name}

    outputs = [work / layout.ONNX_MODEL, work / layout.MODEL_DESCRIPTION, work / layout.MODEL_CARD]
    return cached_step(work, f"{network} seed {seed} export", outputs, export)


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
