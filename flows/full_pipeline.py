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
import json
import logging
import os
import signal
import socket
import sys
import time
from datetime import datetime
from pathlib import Path

import pydantic
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run
from prefect.settings import (
    PREFECT_API_URL,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)
from prefect.tasks import exponential_backoff

from fmnist_pl import __version__, layout
from fmnist_pl.callbacks import forward_flops
from fmnist_pl.cli import USER_ERRORS, quiet_known_warnings, run_cli
from fmnist_pl.data import check_headers, default_cache_dir, load_dataset, locate_dataset, missing_files
from fmnist_pl.errors import ConfigError, DataError, DownloadError
from fmnist_pl.hardware import on_cpu
from fmnist_pl.io import (
    PlaceError,
    check_writable,
    naming_place,
    place_error,
    write_record_on_failure,
    write_text_atomic,
)
from fmnist_pl.networks import NETWORKS
from fmnist_pl.prefect_server import temporary_server, watch_server
from fmnist_pl.report import build_report, markdown_with_embedded_figures
from fmnist_pl.settings import PipelineSettings, add_settings_arguments, profile_config
from fmnist_pl.steps import (
    BadInputError,
    StepFailed,
    TrainingQueue,
    begin_run,
    link,
    log_into,
    mark_dead_runs,
    mark_finished,
    new_run_dir,
    output_into,
    point_latest_at,
    record_lost,
    reuse_finished,
    run_cli_subprocess,
    set_aside_if_damaged,
    set_aside_stale_checkpoints,
    step_key,
    step_lock,
    stop_children,
    stopping,
    track_run,
    training_plan,
    training_queue,
)


def retry_unless_bad_input(task, task_run, state) -> bool:  # noqa: ANN001
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


def network_config(settings: PipelineSettings, network: str) -> Path:
    """The packaged config of `network` in the run's profile."""
    config = profile_config(settings.profile, network)
    if config is None:
        raise ConfigError(f"profile {settings.profile!r} has no config for network {network!r}; choose other --models")
    return config


def training_key(network: str, seed: int, settings: PipelineSettings, data: dict, threads: int | None) -> str:
    """A training step's cache key: what decides its result. The options (less the data's folder: its checksums
    stand in), the seed, the config's text, the code's version and the CPU threads (they change a convolution's
    sums). The launcher changes how, not what."""
    return step_key(step="train", network=network, seed=seed, config=network_config(settings, network).read_text(),
                    data=data["sha256"], version=__version__, options=settings.cli_options(data_dir=None),
                    threads=threads)  # fmt: skip


def evaluation_key(training_dir: str, data: dict, training_split: bool) -> str:
    """An evaluation step's cache key: the training it evaluates, the data, the code, and whether it predicts the
    training split too."""
    return step_key(step="evaluate", train=training_dir, data=data["sha256"], version=__version__,
                    training_split=training_split)  # fmt: skip


@task(retries=2, retry_delay_seconds=[2, 5], retry_condition_fn=retry_unless_bad_input, task_run_name="download")
def download_data(data_dir: str | None, require_official: bool) -> dict:
    """Find or download Fashion-MNIST, verify it and cache the decoded tensors; return its folder and checksums."""
    started = time.perf_counter()
    tensors = load_dataset(data_dir, require_official=require_official)  # what the data module's prepare_data runs
    get_run_logger().info(f"Fashion-MNIST from {tensors.source_dir}, verified")
    return {
        "source_dir": tensors.source_dir,
        # The decoded tensors' own checksum beside the files': a step's key then names the data it was trained on.
        "sha256": {**tensors.sha256, "decoded": tensors.digest()},
        "wall_seconds": round(time.perf_counter() - started, 2),
    }


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
    key = training_key(network, seed, settings, data, threads)
    work = layout.TrainingFolder(layout.step_folder(Path(steps_dir), "train", network, seed, key))
    if finished := reuse_finished(work.path, f"{network} seed {seed} training"):
        return finished
    with queue.turn(ticket, threads or 1), step_lock(work.path) as lock, naming_place(work.path):
        if finished := reuse_finished(work.path, f"{network} seed {seed} training"):  # another run finished it
            return finished
        resume = work.last_checkpoint.is_file() and not set_aside_if_damaged(work.last_checkpoint)
        if not resume:  # an earlier attempt's best.ckpt must never be what this training's evaluation loads
            set_aside_stale_checkpoints(work.best_checkpoint.parent)
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
            keep_open=(lock.fileno(),),
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
    log_prints=False,  # what the in-process CLI prints belongs in the step's log file (output_into), not the flow's
)
def evaluate_model(
    network: str, seed: int, trained: dict, settings: PipelineSettings, data: dict, steps_dir: str
) -> dict:
    """`fmnist-pl test` on the best checkpoint, and `predict` on the test split and, for the run's first seed,
    the training split (the report shows the first seed's training-set confusion matrix only)."""
    config = network_config(settings, network)
    training_split = seed == settings.seeds[0]
    key = evaluation_key(trained["dir"], data, training_split)
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
        with output_into(work.log), naming_place(work.path):
            run_cli(["test", *common, *log_into(work.test)])
            run_cli(["predict", *common, "--data.predict_split=test", *log_into(work.predict("test"))])
            if training_split:  # 55,000 images: most of the step. Without flip TTA, which that matrix needs not.
                run_cli(["predict", *common, "--data.predict_split=train", "--model.test_time_flip=false",
                         *log_into(work.predict("train"))])  # fmt: skip
        result = {"network": network, "seed": seed, "dir": str(work.path), "train_dir": trained["dir"],
                  "wall_seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
        outputs = [work.test_metrics, work.confusion_test, work.predictions("test")]
        return mark_finished(work.path, result, outputs + [work.predictions("train")] * training_split)


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


def training_cost(settings: PipelineSettings, network: str) -> float:
    """A training's relative CPU cost: forward FLOPs per image × epochs (every network sees the same images)."""
    config = yaml.safe_load(network_config(settings, network).read_text())
    epochs = settings.epochs or config.get("trainer", {}).get("max_epochs", 1)
    return forward_flops(NETWORKS[network]()) * epochs


@flow(name="fmnist-full-pipeline", log_prints=True)
def full_pipeline(settings: PipelineSettings = PipelineSettings()) -> str:  # noqa: B008 - immutable, shown in the UI
    """Download → train → evaluate → report; returns the run folder."""
    settings.check_hardware()  # also where a served run lands: the worker's machine decides
    begin_run()
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
    track_run(run.record, record)
    print(f"fmnist-pl pipeline: run folder {run.path}")

    def finish(step: str, future):  # noqa: ANN001, ANN202
        """The step's result, recording in run.json which step failed and why if it did."""
        try:
            result = future.result() if hasattr(future, "result") else future
        except Exception as e:
            record.update(status="failed", failed_step=step, error=f"{type(e).__name__}: {e}")
            write_record_on_failure(run.record, json.dumps(record, indent=2) + "\n")
            raise
        record["steps"][step] = result
        write_text_atomic(run.record, json.dumps(record, indent=2) + "\n")
        return result

    try:
        data = finish("download", download_data.submit(settings.data_dir, settings.require_official))
        # Costliest network first within each seed: the longest training starts first and sets the pace.
        profile_costs = {n: training_cost(settings, n) for n in PipelineSettings(profile=settings.profile).networks()}
        costs = dict(sorted(((n, profile_costs[n]) for n in networks), key=lambda item: -item[1]))
        budget, threads = len(networks) * len(settings.seeds), {}
        if on_cpu(settings.accelerator) and settings.devices in ("auto", "1"):
            # Independent trainings on CPU: each its share of the cores, rather than all of them oversubscribing
            # every core, and no more threads at once than the cores.
            budget, threads = os.cpu_count() or 1, training_plan(profile_costs, os.cpu_count() or 1)
        runs = [(network, seed) for seed in settings.seeds for network in costs]
        trainings = {(n, s): train_model.submit(n, s, settings, data, steps_dir, threads.get(n), budget, ticket)
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
            write_record_on_failure(run.record, json.dumps(record, indent=2) + "\n")
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
        check_writable(settings.output_dir)  # a full or read-only output folder, before Prefect's server starts
        check_data(settings)  # missing, truncated or damaged files and --val-size, not after Prefect has started
    except pydantic.ValidationError as e:
        parser.error("; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}" for err in e.errors()))
    except (ConfigError, DataError, PlaceError) as e:
        parser.error(str(e))
    return args, settings


def check_data(settings: PipelineSettings) -> None:
    """The data checks the pipeline can make in a second, in its own options' words: the named --data-dir (or the
    local copy the run would use) holds the four files, each as long as its header says, and --val-size leaves
    training images. The checksums are checked when the data loads."""
    folder = Path(settings.data_dir).expanduser() if settings.data_dir else None
    if folder is None:
        try:  # the copy the run would use, if there is one here; else the download, checked when it arrives
            folder = locate_dataset(None, default_cache_dir(), download=False)
        except DataError:
            return
    if missing := missing_files(folder):
        raise DataError(f"--data-dir {folder} lacks {', '.join(missing)} (.gz or not); put the Fashion-MNIST IDX "
                        "files there, or leave --data-dir out to use a local copy or the download")  # fmt: skip
    training_images = check_headers(folder)["train-labels-idx1-ubyte"]
    if settings.val_size and settings.val_size >= training_images:
        raise ConfigError(f"--val-size {settings.val_size} leaves no training images ({folder} has "
                          f"{training_images:,}); choose fewer validation images")  # fmt: skip


def prefect_defaults() -> dict:
    """Settings for Prefect's local server, where the user has not set them."""
    defaults = {
        # Analytics race the temporary server's fresh database and print a `database is locked` traceback.
        PREFECT_SERVER_ANALYTICS_ENABLED: False,
        # The default 20 s start-up limit is too short for a busy 2-core laptop.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 120,
    }
    return {setting: value for setting, value in defaults.items() if setting.name not in os.environ}


@contextlib.contextmanager
def prefect_api(output_dir: str):  # noqa: ANN201
    """The user's Prefect server where PREFECT_API_URL names one, else a temporary one that this run owns; either
    is watched, and a run whose server stops answering ends in one line (`end_on_lost_server`)."""
    with temporary_settings(updates=prefect_defaults()):
        if url := PREFECT_API_URL.value():
            with watch_server(url, end_on_lost_server):
                yield
            return
        with temporary_server(Path(output_dir) / ".prefect-server.log") as url, \
                temporary_settings(updates={PREFECT_API_URL: url}), watch_server(url, end_on_lost_server):  # fmt: skip
            print(f"fmnist-pl pipeline: temporary Prefect server on {url} (no PREFECT_API_URL set)")
            yield


def end_on_lost_server(message: str) -> None:
    """The run's Prefect server is gone: stop the trainings, record the failure, say so in one line and exit now.
    A normal exit would run Prefect's exit handlers, which retry their calls to the dead server for minutes."""
    stop_children()
    record_lost(message)
    print(f"fmnist-pl pipeline failed: {message}", file=sys.stderr, flush=True)
    os._exit(1)


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
        if stopping() and record.getMessage().startswith("Finished in state Failed("):
            return False  # a step the flow itself stopped (Ctrl-C, kill): the closing line says so
        if record.getMessage().startswith("Finished in state NotReady("):
            return False  # a step that never started because the one before it failed: said already
        return True


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
    # Ctrl-C reaches every process of the terminal's group: the flow stops its trainings itself, as for `kill`, and
    # the trainings ignore it (they are stopped by the flow) instead of each printing its own traceback.
    signal.signal(signal.SIGINT, stop_on_signal)
    if args.command == "serve":
        with temporary_settings(updates=prefect_defaults()):  # serving keeps Prefect's own server choice
            full_pipeline.serve(name=args.name, cron=args.cron, parameters={"settings": settings.model_dump()})
        return
    with prefect_api(settings.output_dir):
        try:
            run_dir = Path(full_pipeline(settings))
        except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C or `kill`: the flow has stopped its trainings
            stop_children()
            print("fmnist-pl pipeline stopped; run the same command again to resume from the last finished epoch",
                  file=sys.stderr)  # fmt: skip
            sys.exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130)
        except Exception as e:  # Prefect has logged what it needs to; end with the one line that matters
            e = place_error(e, settings.output_dir) or e
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
