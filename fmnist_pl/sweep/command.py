"""The sweep's command line, `python flows/sweep.py [options]`: options, the search space and the storage checked
before Prefect starts, then the sweep flow run with the pipeline's server, signals and one-line endings."""

from __future__ import annotations

import logging
import signal
import sys

import pydantic

from fmnist_pl.errors import ConfigError, DataError, one_line
from fmnist_pl.io import PlaceError, check_writable
from fmnist_pl.pipeline.command import OneLineErrorParser, check_data
from fmnist_pl.pipeline.settings import add_settings_arguments
from fmnist_pl.sweep.settings import SweepSettings, open_storage


def parse_args(argv: list[str] | None = None) -> SweepSettings:
    """The command line, one option per SweepSettings field; bad options, spaces and storages end here."""
    parser = OneLineErrorParser(
        prog="sweep.py",
        description="Tune one network's recipe with Optuna: trials as Prefect tasks, pruned, resumable.",
    )
    parser.error = lambda message: parser.exit(  # type: ignore[method-assign]
        2, f"sweep.py: error: {message}\n(`python flows/sweep.py --help` lists every option)\n"
    )
    add_settings_arguments(parser, SweepSettings)
    args = parser.parse_args(argv)
    try:
        settings = SweepSettings(**{name: getattr(args, name) for name in SweepSettings.model_fields})
        pipeline = settings.pipeline()
        config = pipeline.config_file(settings.network)
        pipeline.check_hardware()
        check_writable(settings.output_dir, "--output-dir")
        check_data(pipeline)
        from fmnist_pl.sweep.space import check_against_fit, load_space

        check_against_fit(load_space(settings.space_file()), config, settings.space_file())
        open_storage(settings.storage_url())
        if settings.dask_address:
            from fmnist_pl.pipeline.cluster import check_cluster_reachable

            check_cluster_reachable(settings.dask_address)
    except pydantic.ValidationError as e:
        parser.error(one_line(e, field_name=lambda loc: "--" + str(loc[0]).replace("_", "-")))
    except (ConfigError, DataError, PlaceError) as e:
        parser.error(str(e))
    return settings


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python flows/sweep.py`."""
    settings = parse_args(argv)
    from fmnist_pl.cli import quiet_known_warnings
    from fmnist_pl.errors import USER_ERRORS
    from fmnist_pl.pipeline.launch import STOP_SIGNALS, OneLineFailures, stop_on_signal
    from fmnist_pl.pipeline.prefect_server import prefect_api
    from fmnist_pl.pipeline.processes import BadInputError, stop_children
    from fmnist_pl.sweep.flow import sweep

    quiet_known_warnings()
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(OneLineFailures())
    signal.signal(signal.SIGTERM, stop_on_signal)
    signal.signal(signal.SIGINT, stop_on_signal)
    with prefect_api(settings.output_dir, "sweep"):
        try:
            folder = sweep(settings)
        except (KeyboardInterrupt, SystemExit, Exception) as e:
            stopped = STOP_SIGNALS or isinstance(e, KeyboardInterrupt | SystemExit)
            stop_children()
            if stopped:
                print(
                    "fmnist-pl sweep stopped: its running trials were stopped and marked failed; run the same command "
                    "again to ask them again (each resumes from its last finished epoch)",
                    file=sys.stderr,
                )
                sys.exit(128 + STOP_SIGNALS[0] if STOP_SIGNALS else 130)
            print(f"fmnist-pl sweep failed: {e}", file=sys.stderr)
            sys.exit(2 if isinstance(e, (*USER_ERRORS, BadInputError)) else 1)
    print(f"report: {folder}/report.html")
