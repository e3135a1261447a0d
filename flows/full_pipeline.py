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
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pydantic
import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.settings import (
    PREFECT_SERVER_ANALYTICS_ENABLED,
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    temporary_settings,
)
from prefect.tasks import exponential_backoff

from fmnist_pl import __version__, layout
from fmnist_pl.callbacks import forward_flops
from fmnist_pl.cli import quiet_known_warnings, run_cli
from fmnist_pl.data import load_dataset
from fmnist_pl.errors import ConfigError, FmnistError
from fmnist_pl.io import write_text_atomic
from fmnist_pl.networks import NETWORKS
from fmnist_pl.report import build_report, markdown_with_embedded_figures
from fmnist_pl.settings import PipelineSettings, add_settings_arguments, profile_config


def step_key(**inputs: object) -> str:
    """A short hash of everything a step's result depends on."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:12]


class BadInputError(RuntimeError):
    """The CLI rejected an option or the data (exit code 2): retrying cannot help."""


def retry_unless_bad_input(task, task_run, state) -> bool:  # noqa: ANN001
    """Prefect retry condition: retry transient failures, never a rejected option or data file."""
    try:
        state.result()
    except (BadInputError, FmnistError):
        return False
    except Exception:
        return True
    return True


def run_cli_subprocess(args: list[str], log_file: Path, env: dict[str, str] | None = None, launcher: str = "") -> None:
    """Run `[launcher] python -m fmnist_pl ARGS` in its own process, streaming its output to the run's log.

    A subprocess, because Lightning's DDP launcher re-runs the current command for every extra rank:
    inside the flow's process that command would be the whole flow. `launcher` (e.g. `srun`) starts the
    command once per task of a multi-node allocation, as Lightning's multi-node guide does.
    """
    logger = get_run_logger()
    command = [*shlex.split(launcher), sys.executable, "-m", "fmnist_pl", *args]
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
        )
        for line in process.stdout:
            log.write(line)
            log.flush()
            if line.strip():
                logger.info(line.rstrip())
    if process.wait() != 0:
        tail = "".join(log_file.read_text().splitlines(keepends=True)[-15:])
        error = BadInputError if process.returncode == 2 else RuntimeError
        raise error(f"`fmnist-pl {args[0]}` failed with exit code {process.returncode}; see {log_file}:\n{tail}")


def log_into(folder: Path) -> list[str]:
    """CLI options that make a run write into exactly `folder` (CSVLogger's save_dir/name/version)."""
    return [f"--trainer.logger.init_args.save_dir={folder.parent}", "--trainer.logger.init_args.name=",
            f"--trainer.logger.init_args.version={folder.name}"]  # fmt: skip


def reuse_finished(work: Path, what: str) -> dict | None:
    """A finished step's recorded result, if `work` holds one."""
    done = work / "done.json"
    if not done.is_file():
        return None
    get_run_logger().info(f"reusing finished {what} {work}")
    return {**json.loads(done.read_text()), "cached": True}


def mark_finished(work: Path, result: dict) -> dict:
    """Record a step's result in its folder; from then on the step is reused."""
    write_text_atomic(work / "done.json", json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}


def network_config(settings: PipelineSettings, network: str) -> Path:
    """The packaged config of `network` in the run's profile."""
    config = profile_config(settings.profile, network)
    if config is None:
        raise ConfigError(f"profile {settings.profile!r} has no config for network {network!r}; choose other --models")
    return config


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5), task_run_name="download")
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


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_condition_fn=retry_unless_bad_input,
    task_run_name="train-{network}",
)
def train_model(
    network: str, settings: PipelineSettings, data: dict, steps_dir: str, env: dict[str, str] | None = None
) -> dict:
    """`fmnist-pl fit` for one network; cached on its inputs, resumed from last.ckpt after an interruption."""
    logger = get_run_logger()
    config = network_config(settings, network)
    options = settings.cli_options(data_dir=data["source_dir"])
    # The key holds what decides the result: the options (less the data's folder: its checksums stand in),
    # the config's text and the code's version. Thread counts and the launcher change how, not what.
    key = step_key(step="train", network=network, config=config.read_text(), data=data["sha256"], version=__version__,
                   options=settings.cli_options(data_dir=None))  # fmt: skip
    work = layout.TrainingFolder(layout.step_folder(Path(steps_dir), "train", network, key))
    if finished := reuse_finished(work.path, f"{network} training"):
        return finished
    resume = [f"--ckpt_path={work.last_checkpoint}"] if work.last_checkpoint.is_file() else []
    if resume:
        logger.info(f"{network}: resuming the interrupted training from {work.last_checkpoint}")
    started = time.perf_counter()
    run_cli_subprocess(
        ["fit", f"--config={config}", *options, *log_into(work.path), "--trainer.enable_progress_bar=false", *resume],
        work.log,
        env=env,
        launcher=settings.train_launcher or "",
    )  # fmt: skip
    result = {
        "network": network,
        "dir": str(work.path),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "resumed": bool(resume),
    }
    return mark_finished(work.path, result)


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=retry_unless_bad_input,
    task_run_name="evaluate-{network}",
)
def evaluate_model(network: str, trained: dict, settings: PipelineSettings, data: dict, steps_dir: str) -> dict:
    """`fmnist-pl test` on the best checkpoint, and `predict` on the test and training splits (for the report)."""
    config = network_config(settings, network)
    key = step_key(step="evaluate", train=trained["dir"], data=data["sha256"], version=__version__)
    work = layout.EvaluationFolder(layout.step_folder(Path(steps_dir), "evaluate", network, key))
    if finished := reuse_finished(work.path, f"{network} evaluation"):
        return finished
    best = layout.TrainingFolder(Path(trained["dir"])).best_checkpoint
    one_device = settings.cli_options(data_dir=data["source_dir"], devices=1, strategy="auto", num_nodes=1)
    common = [f"--config={config}", f"--ckpt_path={best}", *one_device,
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    started = time.perf_counter()
    # In this process (one device, so no DDP launcher is involved): saves three interpreter start-ups.
    run_cli(["test", *common, *log_into(work.test)])
    for split in ("test", "train"):
        run_cli(["predict", *common, f"--data.predict_split={split}", *log_into(work.predict(split))])
    result = {"network": network, "dir": str(work.path), "train_dir": trained["dir"],
              "wall_seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    return mark_finished(work.path, result)


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


def cpu_thread_shares(costs: dict[str, float], cores: int) -> dict[str, int]:
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
    """A fresh outputs/<run id>/ (never an earlier run's) and `outputs/latest` pointing at it."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        run_dir = output_dir / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
            break
        except FileExistsError:
            continue
    latest = output_dir / f".latest.{os.getpid()}"
    latest.unlink(missing_ok=True)
    latest.symlink_to(run_dir.name)
    os.replace(latest, output_dir / layout.LATEST)  # atomic: `latest` always points at a whole run folder
    return run_dir


def link(link_path: Path, target: Path) -> None:
    """A relative symbolic link, so that outputs/ can be moved or archived whole and its links still resolve."""
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(os.path.relpath(target, link_path.parent))


@flow(name="fmnist-full-pipeline", log_prints=True)
def full_pipeline(settings: PipelineSettings = PipelineSettings()) -> str:  # noqa: B008 - immutable, shown in the UI
    """Download → train → evaluate → report; returns the run folder."""
    networks = settings.networks()
    configs = {network: network_config(settings, network) for network in networks}  # fails before any work
    output = Path(settings.output_dir).resolve()
    run = layout.RunFolder(new_run_dir(output))
    steps_dir = str(output / layout.STEPS_DIR)
    record = {
        "run_dir": str(run.path),
        "status": "running",
        "networks": networks,
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

    data = finish("download", download_data.submit(settings.data_dir, settings.require_official))
    env: dict[str, dict | None] = dict.fromkeys(networks)
    if on_cpu(settings.accelerator) and len(networks) > 1 and settings.devices in ("auto", "1"):
        # Independent trainings side by side on CPU: each gets its share of the cores rather than all of them
        # oversubscribing every core.
        threads = cpu_thread_shares({n: training_cost(settings, n) for n in networks}, os.cpu_count() or 1)
        env = {n: {"OMP_NUM_THREADS": str(threads[n])} for n in networks}
    trainings = {n: train_model.submit(n, settings, data, steps_dir, env[n]) for n in networks}
    evaluations = {n: evaluate_model.submit(n, trainings[n], settings, data, steps_dir) for n in networks}
    trained = {n: finish(f"train-{n}", trainings[n]) for n in networks}
    evaluated = {n: finish(f"evaluate-{n}", evaluations[n]) for n in networks}
    for network in networks:  # the run folder shows each network's step folders, which stay shared and cached
        link(run.training(network).path, Path(trained[network]["dir"]))
        link(run.evaluation(network).path, Path(evaluated[network]["dir"]))
    finish("report", write_report.submit(str(run.path)))
    record.update(status="completed", finished=datetime.now().isoformat())
    write_text_atomic(run.record, json.dumps(record, indent=2) + "\n")
    print(f"fmnist-pl pipeline: done, report at {run.report('.md')}")
    return str(run.path)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PipelineSettings]:
    """The command line: `run` (default) or `serve`, and one option per PipelineSettings field."""
    parser = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python flows/full_pipeline.py`."""
    quiet_known_warnings()
    args, settings = parse_args(argv)
    with temporary_settings(updates=prefect_defaults()):
        if args.command == "serve":
            full_pipeline.serve(name=args.name, cron=args.cron, parameters={"settings": settings.model_dump()})
            return
        try:
            full_pipeline(settings)
        except Exception as e:  # Prefect has logged the traceback; end with the one line that matters
            print(f"fmnist-pl pipeline failed: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)


if __name__ == "__main__":
    main()
