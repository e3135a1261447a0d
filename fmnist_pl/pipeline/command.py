"""The pipeline's command line, `python flows/full_pipeline.py [run|serve] [options]`: options checked before
Prefect starts, a Prefect server for the run, one line for a failure or a stop, and the closing table."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

import pydantic
from prefect.settings import temporary_settings

from fmnist_pl import layout
from fmnist_pl.cli import USER_ERRORS, quiet_known_warnings
from fmnist_pl.errors import ConfigError, DataError
from fmnist_pl.fashion_mnist import (
    DATA_DIR_ENV,
    check_download_reachable,
    check_headers,
    default_cache_dir,
    local_copy,
    locate_dataset,
)
from fmnist_pl.io import PlaceError, check_writable, place_error
from fmnist_pl.pipeline.flow import full_pipeline
from fmnist_pl.pipeline.prefect_server import prefect_api, prefect_defaults
from fmnist_pl.pipeline.processes import BadInputError, StepFailed, stop_children, stopping
from fmnist_pl.pipeline.settings import PipelineSettings, add_settings_arguments


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, with the error first and a hint after it instead of the whole usage before it."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n(`python flows/full_pipeline.py --help` lists every option)\n")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, PipelineSettings]:
    """The command line: `run` (default) or `serve`, and one option per PipelineSettings field."""
    parser = OneLineErrorParser(
        prog="full_pipeline.py",
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
            settings.config_file(network)
        settings.check_hardware()
        check_writable(settings.output_dir, "--output-dir")  # full, read-only, a file, /proc: before Prefect starts
        # Missing, truncated or damaged files and --val-size, not after Prefect has started; a served deployment
        # downloads when its runs come, so only a run now needs a network now.
        check_data(settings, needs_network_now=args.command == "run")
    except pydantic.ValidationError as e:
        parser.error(
            "; ".join(f"--{str(err['loc'][0]).replace('_', '-')}: {validation_message(err)}" for err in e.errors())
        )
    except (ConfigError, DataError, PlaceError) as e:
        parser.error(str(e))
    return args, settings


def validation_message(error: dict) -> str:
    """A pydantic error's message; for a validator's own error, its own words (without pydantic's "Value error, ")."""
    own = (error.get("ctx") or {}).get("error")
    return str(own) if error["type"] == "value_error" and own else error["msg"]


def check_data(settings: PipelineSettings, needs_network_now: bool = True) -> None:
    """The data checks the pipeline can make in a second, in its own options' words: the named --data-dir (or the
    local copy the run would use) holds the four files, each as long as its header says, and --val-size leaves
    training images; with no copy at all, that there is a network to download one. The checksums are checked when
    the data loads."""
    cache = default_cache_dir()
    if settings.data_dir or os.environ.get(DATA_DIR_ENV):
        folder = locate_dataset(settings.data_dir, cache, download=False, option="--data-dir")
    elif (folder := local_copy(cache)) is None:
        if needs_network_now:
            check_download_reachable(cache, "--data-dir")
        return
    training_images = check_headers(folder)["train-labels-idx1-ubyte"]
    if settings.val_size and settings.val_size >= training_images:
        raise ConfigError(f"--val-size {settings.val_size} leaves no training images ({folder} has "
                          f"{training_images:,}); choose fewer validation images")  # fmt: skip


class OneLineFailures(logging.Filter):
    """Prefect logs a failed step's traceback, and the flow's again. For a failure whose message already says
    what went wrong and where its log is (a rejected option, bad data, a damaged checkpoint, a failed command),
    that is a wall of lines around one sentence: keep the sentence. Other errors (bugs) keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        if isinstance(error, (*USER_ERRORS, StepFailed)) and message.startswith("Encountered exception during"):
            return False  # the flow repeating its failed step's error: the step has said it
        if record.name == "prefect.flow_runs" and message.startswith("Finished in state Failed("):
            return False  # main() ends with the reason in one line; the UI shows the flow's state anyway
        if stopping() and message.startswith("Finished in state Failed("):
            return False  # a step the flow itself stopped (Ctrl-C, kill): the closing line says so
        # A step that never started because the one before it failed: said already.
        return not message.startswith("Finished in state NotReady(")


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
