"""Running the pipeline's checked command line (command.py): the run's Prefect server, signals that stop it, one
line for a failure or a stop, and the closing table."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from prefect.settings import temporary_settings

from fmnist_pl import layout
from fmnist_pl.errors import USER_ERRORS
from fmnist_pl.io import place_error
from fmnist_pl.pipeline.flow import full_pipeline
from fmnist_pl.pipeline.prefect_server import prefect_api, prefect_defaults
from fmnist_pl.pipeline.processes import BadInputError, StepFailed, stop_children, stopping
from fmnist_pl.pipeline.settings import PipelineSettings


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


STOP_SIGNALS: list[int] = []  # the signals that stopped this process's pipeline (Ctrl-C, kill)


def stop_on_signal(signum: int, frame: object) -> None:
    """`kill <flow PID>` outside a flow run (Prefect handles SIGTERM inside one): leave through the normal exit
    path, so that Prefect's temporary server is stopped too instead of orphaned."""
    STOP_SIGNALS.append(signum)
    stop_children()
    raise SystemExit(128 + signum)


def say_stopped(code: int) -> None:
    stop_children()
    print(
        "fmnist-pl pipeline stopped; run the same command again to resume from the last finished epoch", file=sys.stderr
    )
    sys.exit(code)


def launch(args: argparse.Namespace, settings: PipelineSettings) -> None:
    """Run the pipeline once (or serve it) with checked options: the run's Prefect server, signals that stop it,
    one line for a failure or a stop, and the closing table."""
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
            say_stopped(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 130)
        except Exception as e:  # Prefect has logged what it needs to; end with the one line that matters
            if STOP_SIGNALS:  # the stop's SystemExit, wrapped by whatever it interrupted (pydantic, while submitting)
                say_stopped(128 + STOP_SIGNALS[0])
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
        rows.append(
            (
                network,
                ",".join(map(str, summary["seeds"])),
                f"{accuracy['mean']:.2%}{std} ({accuracy['min']:.2%}-{accuracy['max']:.2%})",
                f"{r['training_wall_seconds']['mean']:.0f} s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
