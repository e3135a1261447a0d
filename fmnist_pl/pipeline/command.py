"""The pipeline's command line, `python flows/full_pipeline.py [run|serve] [options]`: options checked before
Prefect starts (launch.py then runs them)."""

from __future__ import annotations

import argparse
import os

import pydantic

from fmnist_pl.errors import ConfigError, DataError, one_line
from fmnist_pl.fashion_mnist import (
    DATA_DIR_ENV,
    check_download_reachable,
    check_headers,
    default_cache_dir,
    local_copy,
    locate_dataset,
)
from fmnist_pl.io import PlaceError, check_writable
from fmnist_pl.pipeline.cluster import check_cluster_reachable
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
        if settings.dask_address and args.command == "run":
            check_cluster_reachable(settings.dask_address)
    except pydantic.ValidationError as e:  # named by this command's own options: --val-size, not val_size
        parser.error(one_line(e, field_name=lambda loc: "--" + str(loc[0]).replace("_", "-")))
    except (ConfigError, DataError, PlaceError) as e:
        parser.error(str(e))
    return args, settings


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
        raise ConfigError(
            f"--val-size {settings.val_size} leaves no training images ({folder} has "
            f"{training_images:,}); choose fewer validation images"
        )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python flows/full_pipeline.py`."""
    args, settings = parse_args(argv)
    # Lightning and Prefect load only now, for options that passed: a wrong one ends in about 4 s, not 13 (2 cores).
    from fmnist_pl.pipeline.launch import launch

    launch(args, settings)
