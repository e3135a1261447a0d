"""The `fmnist-pl` command: Lightning CLI (fit, validate, test, predict) plus `report`."""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fmnist_pl.callbacks import EpochHistory, EvaluationFiles, LastCheckpoint, PredictionsWriter
from fmnist_pl.data import FashionMNISTDataModule
from fmnist_pl.errors import ConfigError, FmnistError
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.settings import packaged_configs

CKPT_KEYWORDS = {"best", "last", "hpc", "registry"}  # ckpt_path values Lightning resolves itself


def quiet_known_warnings() -> None:
    """Silence warnings that do not apply to this project; the entry points call it, importing the package does not."""
    # An advert for a cloud logger, a torch/Lightning deprecation users cannot act on, and the step-logging
    # interval (metrics are logged per epoch).
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not r.getMessage().startswith("💡"))
    for message in (
        r".*isinstance\(treespec, LeafSpec\)",
        r".*smaller than the logging interval",
        # Testing or predicting from another run's checkpoint is the normal case here, not a surprise.
        r".*The dirpath has changed from.*",
        # The whole dataset lives in memory and batches are tensor slices: worker processes would only add
        # start-up time and copies, so Lightning's advice to add workers does not apply.
        r".*does not have many workers.*",
        # ShardedBatches' __len__ is exact: it runs in the main process and shards by rank itself.
        r".*`IterableDataset` has `__len__` defined.*",
        # PredictionsWriter needs no batch indices (ShardedBatches keeps the input order).
        r".*Couldn't infer the batch indices.*",
        # The module's transfer_batch_to_device is meant to win over the data module's (which has none).
        r".*overridden `transfer_batch_to_device` in `LightningModule`.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def resolve_config_names(argv: list[str]) -> list[str]:
    """Let `--config reference_dense` name a packaged config; real paths pass through unchanged."""
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        name = None
        if arg == "--config" and i + 1 < len(resolved):
            name, slot = resolved[i + 1], i + 1
        elif arg.startswith("--config="):
            name, slot = arg.split("=", 1)[1], None
        if name is None or Path(name).exists():
            continue
        path = packaged_configs().get(name.replace("-", "_").removesuffix(".yaml"))
        if path is None:
            raise ConfigError(
                f"config {name!r} is neither a file nor a packaged config ({', '.join(packaged_configs())})"
            )
        if slot is None:
            resolved[i] = f"--config={path}"
        else:
            resolved[slot] = str(path)
    return resolved


def default_progress_bar() -> ProgressBar:
    """The CLI's progress bar, redrawn 4 times a second instead of Rich's default 100: on 2 cores the redraw
    thread competes with training for the CPU (about 9 % of a small network's step at 100 Hz)."""
    return RichProgressBar(refresh_rate=4)


class FashionMNISTCLI(LightningCLI):
    """LightningCLI with the project's checkpointing, CSV logging and up-front checks."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc",
                "checkpoint.mode": "max",
                "checkpoint.filename": "best",  # stable names the pipeline can point at; last.ckpt: LastCheckpoint
                "checkpoint.auto_insert_metric_name": False,
            }
        )

    def instantiate_trainer(self, **kwargs: object) -> object:
        config = self.config_init[self.subcommand]["trainer"]
        callbacks = [*(config.get("callbacks") or []), EpochHistory(), EvaluationFiles()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(default_progress_bar())
        if self.subcommand == "predict":  # only then: every callback costs hook calls on every training step
            callbacks.append(PredictionsWriter())
        kwargs["callbacks"] = callbacks
        return super().instantiate_trainer(**kwargs)

    def before_instantiate_classes(self) -> None:
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path and ckpt_path not in CKPT_KEYWORDS and not Path(ckpt_path).is_file():
            raise ConfigError(f"checkpoint {ckpt_path} does not exist; pass a .ckpt file written by `fmnist-pl fit`")


_one_cli_at_a_time = threading.Lock()  # a LightningCLI run sets process-wide seeds and warning filters


def run_cli(argv: list[str] | None = None) -> None:
    """Run one Lightning CLI subcommand with the project's defaults (`argv` None: the command line)."""
    with _one_cli_at_a_time:
        _run_cli(argv)


def _run_cli(argv: list[str] | None) -> None:
    if argv is None:
        # Rewritten in place rather than passed as `args`: Lightning's DDP launcher re-runs sys.argv for each rank.
        sys.argv[1:] = resolve_config_names(sys.argv[1:])
    FashionMNISTCLI(
        FashionMNISTClassifier,
        FashionMNISTDataModule,
        args=None if argv is None else resolve_config_names(argv),
        seed_everything_default=0,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": "outputs", "name": "runs"},
            },
            "callbacks": [LastCheckpoint()],  # listed here, so that `--trainer.callbacks` can replace it
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `fmnist-pl` and `python -m fmnist_pl`."""
    quiet_known_warnings()
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] == "report":
            from fmnist_pl.report import report_main

            report_main(args[1:])
        else:
            run_cli(argv)
    except FmnistError as e:
        print(f"fmnist-pl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
