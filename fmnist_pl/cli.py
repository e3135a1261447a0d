"""The `fmnist-pl` command: Lightning CLI (fit, validate, test, predict) plus `report`."""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from fmnist_pl.data import FashionMNISTDataModule
from fmnist_pl.errors import ConfigError, FmnistError
from fmnist_pl.module import FashionMNISTClassifier, LastCheckpoint, PredictionsWriter

CONFIG_DIR = Path(__file__).parent / "configs"
CKPT_KEYWORDS = {"best", "last", "hpc", "registry"}  # ckpt_path values Lightning resolves itself

# Console noise that does not apply here: an advert for a cloud logger, a torch/Lightning deprecation
# users cannot act on, and the step-logging interval (metrics are logged per epoch).
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: not r.getMessage().startswith("💡"))
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r".*smaller than the logging interval")
# Testing or predicting from another run's checkpoint is the normal case here, not a surprise.
warnings.filterwarnings("ignore", message=r".*The dirpath has changed from.*")


def packaged_configs() -> dict[str, Path]:
    """Config files shipped in the package, by name (`reference_dense`, `fast_cnn`, ...)."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


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


class EpochMetricsRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, minus its per-batch refresh of the metrics shown beside the bar.

    Every metric here is logged once per epoch, and the parent refreshes them at the end of each training and
    validation epoch; re-reading them after every batch cost about 2 % of a small network's step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # as the parent does, for a run resumed mid-epoch
        self._update(self.train_progress_bar_id, batch_idx + 1)


def default_progress_bar() -> ProgressBar:
    """The CLI's progress bar, redrawn 4 times a second instead of Rich's default 100: on 2 cores the redraw
    thread competes with training for the CPU (about 9 % of a small network's step at 100 Hz)."""
    return EpochMetricsRichProgressBar(refresh_rate=4)


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
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
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
            "callbacks": [LastCheckpoint()],
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `fmnist-pl` and `python -m fmnist_pl`."""
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
