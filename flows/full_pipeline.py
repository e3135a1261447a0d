"""The fmnist-pl pipeline as a Prefect flow: download → train both networks → evaluate each → comparison report.

    python flows/full_pipeline.py                         # one run, no Prefect server needed
    python flows/full_pipeline.py --help                  # every option
    python flows/full_pipeline.py serve --cron "0 3 * * *"  # a scheduled deployment, shown in the Prefect UI

Every step is a retryable task that passes file paths, not tensors. Training and evaluation run the same
`fmnist-pl` CLI a user runs by hand. Finished steps are cached under <output dir>/steps/, keyed on their
settings and the data's checksums; an interrupted training step resumes from its last checkpoint.
"""

from __future__ import annotations

import os

# Prefect's analytics race the temporary server's fresh database and print a `database is locked`
# traceback on a new machine; a user setting still wins.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# The temporary server's default 20 s start-up limit is too short for a busy 2-core laptop.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from datetime import datetime  # noqa: E402
from pathlib import Path  # noqa: E402

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

from fmnist_pl import __version__  # noqa: E402
from fmnist_pl.cli import packaged_configs, run_cli  # noqa: E402
from fmnist_pl.data import load_dataset  # noqa: E402
from fmnist_pl.errors import FmnistError  # noqa: E402
from fmnist_pl.io import write_text_atomic  # noqa: E402
from fmnist_pl.report import build_report  # noqa: E402

NETWORKS = ("dense", "cnn")
PROFILES = ("fast", "reference")


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


def cli_settings(settings: dict, data: dict) -> list[str]:
    """The CLI options that carry the flow's settings (None: the profile's value)."""
    options = {
        "--trainer.max_epochs": settings["epochs"],
        "--data.batch_size": settings["batch_size"],
        "--data.val_size": settings["val_size"],
        "--trainer.accelerator": settings["accelerator"],
        "--trainer.devices": settings["devices"],
        "--trainer.strategy": settings["strategy"],
        "--trainer.num_nodes": settings["num_nodes"],
        "--seed_everything": settings["seed"],
        "--data.data_dir": data["source_dir"],
        "--data.require_official": settings["require_official"],
    }
    return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items() if v is not None]


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
def train_model(network: str, settings: dict, data: dict, steps_dir: str) -> dict:
    """`fmnist-pl fit` for one network; cached on its inputs, resumed from last.ckpt after an interruption."""
    logger = get_run_logger()
    config = packaged_configs()[f"{settings['profile']}_{network}"]
    overrides = cli_settings(settings, data)
    # Thread counts and the launcher change how training runs, not what it computes.
    inputs = {k: v for k, v in settings.items() if k not in ("env", "train_launcher")}
    key = step_key(step="train", network=network, config=config.read_text(), settings=inputs, data=data["sha256"],
                   version=__version__)  # fmt: skip
    work = Path(steps_dir) / f"train-{network}-{key}"
    if finished := reuse_finished(work, f"{network} training"):
        return finished
    last = work / "checkpoints" / "last.ckpt"
    resume = [f"--ckpt_path={last}"] if last.is_file() else []
    if resume:
        logger.info(f"{network}: resuming the interrupted training from {last}")
    started = time.perf_counter()
    run_cli_subprocess(
        ["fit", f"--config={config}", *overrides, *log_into(work), "--trainer.enable_progress_bar=false", *resume],
        work / "train.log",
        env=settings.get("env"),
        launcher=settings["train_launcher"] or "",
    )  # fmt: skip
    result = {
        "network": network,
        "dir": str(work),
        "best_checkpoint": str(work / "checkpoints" / "best.ckpt"),
        "wall_seconds": round(time.perf_counter() - started, 2),
        "resumed": bool(resume),
    }
    return mark_finished(work, result)


@task(
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=5),
    retry_condition_fn=retry_unless_bad_input,
    task_run_name="evaluate-{network}",
)
def evaluate_model(network: str, trained: dict, settings: dict, data: dict, steps_dir: str) -> dict:
    """`fmnist-pl test` on the best checkpoint, and `predict` on the test and training splits (for the report)."""
    config = packaged_configs()[f"{settings['profile']}_{network}"]
    key = step_key(step="evaluate", train=trained["dir"], data=data["sha256"], version=__version__)
    work = Path(steps_dir) / f"evaluate-{network}-{key}"
    if finished := reuse_finished(work, f"{network} evaluation"):
        return finished
    one_device = {**settings, "devices": 1, "strategy": "auto", "num_nodes": 1}
    common = [f"--config={config}", f"--ckpt_path={trained['best_checkpoint']}", *cli_settings(one_device, data),
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]  # fmt: skip
    started = time.perf_counter()
    # In this process (one device, so no DDP launcher is involved): saves three interpreter start-ups.
    run_cli(["test", *common, *log_into(work / "test")])
    for split in ("test", "train"):
        run_cli(["predict", *common, f"--data.predict_split={split}", *log_into(work / f"predict_{split}")])
    result = {"network": network, "dir": str(work), "train_dir": trained["dir"],
              "wall_seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
    return mark_finished(work, result)


@task(retries=1, task_run_name="report")
def write_report(run_dir: str) -> dict:
    """Build the comparison report from the run folder's files and publish it as Prefect artifacts."""
    started = time.perf_counter()
    summary = build_report(Path(run_dir))
    markdown = (Path(run_dir) / "report.md").read_text()
    create_markdown_artifact(markdown=markdown, key="fmnist-report", description="fmnist-pl comparison report")
    create_table_artifact(table=summary["table"], key="fmnist-results", description="Test accuracy per network")
    return {"report": str(Path(run_dir) / "report.md"), "wall_seconds": round(time.perf_counter() - started, 2)}


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's accelerator choice resolves to the CPU on this machine."""
    import torch

    return accelerator == "cpu" or (
        accelerator == "auto" and not torch.cuda.is_available() and not torch.backends.mps.is_available()
    )


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
    os.replace(latest, output_dir / "latest")  # atomic: `latest` always points at a whole run folder
    return run_dir


@flow(name="fmnist-full-pipeline", log_prints=True)
def full_pipeline(
    models: list[str] | None = None,
    profile: str = "fast",
    epochs: int | None = None,
    batch_size: int | None = None,
    val_size: int | None = None,
    accelerator: str = "auto",
    devices: str = "auto",
    strategy: str = "auto",
    num_nodes: int = 1,
    train_launcher: str | None = None,
    seed: int = 0,
    data_dir: str | None = None,
    output_dir: str = "outputs",
    require_official: bool = True,
) -> str:
    """Download → train → evaluate → report; returns the run folder. None: both models, the profile's epochs etc."""
    models = list(models or NETWORKS)
    unknown = sorted(set(models) - set(NETWORKS)) + ([profile] if profile not in PROFILES else [])
    if unknown or not models:
        raise ValueError(f"unknown model or profile {unknown}: models are {NETWORKS}, profiles {PROFILES}")
    output = Path(output_dir).resolve()
    run_dir = new_run_dir(output)
    steps_dir = str(output / "steps")
    settings = {"profile": profile, "epochs": epochs, "batch_size": batch_size, "val_size": val_size, "accelerator": accelerator,
                "devices": devices, "strategy": strategy, "num_nodes": num_nodes, "train_launcher": train_launcher, "seed": seed,
                "require_official": require_official}  # fmt: skip
    record = {
        "run_dir": str(run_dir),
        "status": "running",
        "settings": settings,
        "steps": {},
        "started": datetime.now().isoformat(),
    }
    write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
    print(f"fmnist-pl pipeline: run folder {run_dir}")

    def finish(step: str, future):  # noqa: ANN001, ANN202
        """The step's result, recording in run.json which step failed and why if it did."""
        try:
            result = future.result() if hasattr(future, "result") else future
        except Exception as e:
            record.update(status="failed", failed_step=step, error=f"{type(e).__name__}: {e}")
            write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
            raise
        record["steps"][step] = result
        write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
        return result

    data = finish("download", download_data.submit(data_dir, require_official))
    if on_cpu(accelerator) and len(models) > 1 and devices in ("auto", "1", 1):
        # Independent trainings side by side on CPU: give each its share of the cores rather than
        # letting both oversubscribe every core.
        settings["env"] = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(models)))}
    trainings = {m: train_model.submit(m, settings, data, steps_dir) for m in models}
    evaluations = {m: evaluate_model.submit(m, trainings[m], settings, data, steps_dir) for m in models}
    trained = {m: finish(f"train-{m}", trainings[m]) for m in models}
    evaluated = {m: finish(f"evaluate-{m}", evaluations[m]) for m in models}
    for network in models:  # the run folder shows each network's step folders, which stay shared and cached
        (run_dir / network).mkdir()
        (run_dir / network / "train").symlink_to(trained[network]["dir"])
        (run_dir / network / "evaluate").symlink_to(evaluated[network]["dir"])
    finish("report", write_report.submit(str(run_dir)))
    record.update(status="completed", finished=datetime.now().isoformat())
    write_text_atomic(run_dir / "run.json", json.dumps(record, indent=2) + "\n")
    print(f"fmnist-pl pipeline: done, report at {run_dir / 'report.md'}")
    return str(run_dir)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    parser = argparse.ArgumentParser(
        description="Train, evaluate and compare the reference study's two networks on Fashion-MNIST.",
        epilog="`serve --cron EXPR` registers a scheduled deployment instead of running once.",
    )
    parser.add_argument(
        "command", nargs="?", choices=["run", "serve"], default="run", help="run once (default) or serve"
    )
    parser.add_argument("--models", nargs="+", choices=NETWORKS, default=list(NETWORKS), help="networks to train")
    parser.add_argument("--profile", choices=PROFILES, default="fast", help="fast (default) or reference (the study)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the profile's)")
    parser.add_argument("--batch-size", type=int, help="training batch size per device (default: the profile's)")
    parser.add_argument("--val-size", type=int, help="validation images, the first of the training set (default 5000)")
    parser.add_argument("--accelerator", default="auto", help="cpu, gpu, mps, auto (default)")
    parser.add_argument("--devices", default="auto", help="devices per node: a number, or auto (default)")
    parser.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes for multi-node DDP (default 1)")
    parser.add_argument("--train-launcher", help="command that starts training once per task, e.g. 'srun' in a "
                        "SLURM allocation for --num-nodes > 1")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed for all randomness (default 0)")
    parser.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files (default: $FMNIST_DATA_DIR, "
                        "a local copy, or the official download)")  # fmt: skip
    parser.add_argument("--output-dir", default="outputs", help="where runs and cached steps go (default outputs)")
    parser.add_argument("--not-official", dest="require_official", action="store_false",
                        help="accept IDX files other than the official release (own or test data)")  # fmt: skip
    parser.add_argument("--cron", help="with serve: the schedule, e.g. '0 3 * * *'")
    parser.add_argument("--name", default="fmnist-full-pipeline", help="with serve: the deployment's name")
    args = parser.parse_args(argv)
    if args.command == "serve" and not args.cron:
        parser.error("serve needs --cron, e.g. --cron '0 3 * * *'")
    parameters = {k: getattr(args, k) for k in ("models", "profile", "epochs", "batch_size", "val_size", "accelerator", "devices",
                                                 "strategy", "num_nodes", "train_launcher", "seed", "data_dir", "output_dir",
                                                 "require_official")}  # fmt: skip
    return args, parameters


if __name__ == "__main__":
    args, parameters = parse_args()
    if args.command == "serve":
        full_pipeline.serve(name=args.name, cron=args.cron, parameters=parameters)
    else:
        try:
            full_pipeline(**parameters)
        except Exception as e:  # Prefect has logged the traceback; end with the one line that matters
            print(f"fmnist-pl pipeline failed: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(1)
