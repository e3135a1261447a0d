"""The `fmnist-pl` command: Lightning CLI (fit, validate, test, predict), `evaluate` (fmnist_pl/evaluation.py) and
`report`."""

from __future__ import annotations

import inspect
import logging
import sys
import warnings
from pathlib import Path

import lightning as L
import pydantic
import yaml
from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from fmnist_pl.callbacks import (
    EpochHistory,
    EvaluationFiles,
    HParamsSummary,
    LastCheckpoint,
    PredictionsWriter,
    TestPredictions,
)
from fmnist_pl.configs import packaged_configs
from fmnist_pl.data import FashionMNISTDataModule
from fmnist_pl.errors import ConfigError, FmnistError, check_seed, one_line
from fmnist_pl.evaluation import FashionMNISTTrainer
from fmnist_pl.hardware import cpu_has_fast_bf16, keep_freed_memory, on_cpu
from fmnist_pl.io import check_output_place, place_error
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.networks import read_checkpoint
from fmnist_pl.predict_images import load_predict_images

CKPT_KEYWORDS = {"best", "last", "hpc", "registry"}  # ckpt_path values Lightning resolves itself
# Model options that only change how a trained network is used, so `test` and `predict` take them from the command
# line even with a checkpoint (whose hyper-parameters replace every other model option).
INFERENCE_OPTIONS = ("test_time_flip",)
DEFAULT_SAVE_DIR = "outputs"  # where CLI runs go (outputs/runs/version_N/) unless --trainer.default_root_dir says


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
        # Training loss and accuracy are reduced over every rank before they are logged (train_epoch_results).
        r".*It is recommended to use `self.log\('train/.*sync_dist=True.*",
        # PredictionsWriter needs no batch indices (ShardedBatches keeps the input order).
        r".*Couldn't infer the batch indices.*",
        # EMA weight averaging runs during fit only; the checkpoint holds the averaged weights already.
        r".*callbacks used to create the checkpoint need to be provided.*EMAWeightAveraging.*",
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
        if name is not None and Path(name).is_file():
            check_config_file(Path(name))
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


def check_config_file(path: Path) -> None:
    """A config file is UTF-8 YAML holding a mapping of options; else one ConfigError naming the file and, for a
    syntax error, its line (jsonargparse names neither, or ends in a 70-line traceback)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text ({e.reason} at byte {e.start}); pass a YAML file") from e
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {path} is not valid YAML{where}: {problem}; fix that line") from e
    if content is None:
        raise ConfigError(
            f"config {path} is empty; write options into it (`fmnist-pl fit --print_config` lists them) or leave it out"
        )
    if not isinstance(content, dict):
        raise ConfigError(f"config {path} holds a {type(content).__name__}, not options (`key: value` lines)")


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
                # Always best.ckpt, never best-v1.ckpt beside an older one: whoever loads best.ckpt gets this run's.
                "checkpoint.enable_version_counter": False,
            }
        )
        # The data's shuffling and flips follow the run's seed (DDP ranks re-run the command, so they get it too).
        parser.link_arguments("seed_everything", "data.seed", compute_fn=data_seed)

    def instantiate_trainer(self, **kwargs: object) -> object:
        config = self.config_init[self.subcommand]["trainer"]
        callbacks = [*(config.get("callbacks") or []), EpochHistory(), EvaluationFiles()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(default_progress_bar())
        if self.subcommand in ("predict", "evaluate"):  # only then: a callback costs hook calls on every step
            callbacks.append(PredictionsWriter(name_by_split=self.subcommand == "evaluate"))
        if self.subcommand == "evaluate":
            callbacks.append(TestPredictions())
        kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if self.subcommand == "fit":
            add_tensorboard(trainer)
        return trainer

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's four subcommands, plus `evaluate` (FashionMNISTTrainer.evaluate)."""
        return {**LightningCLI.subcommands(), "evaluate": {"model", "datamodule"}}

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        self.command_line = list(sys.argv[1:] if args is None else args)  # what the user typed, for the checks below
        super().parse_arguments(parser, args)
        # Next, Lightning replaces the model's options with the checkpoint's hyper-parameters, without a word when
        # they disagree and with a traceback when the file is damaged. Check the file first.
        config = self.config.get(self.config.get("subcommand") or "", {})
        seed = config.get("seed_everything") if config else None
        if isinstance(seed, int) and not isinstance(seed, bool):
            try:
                check_seed(seed)
            except ConfigError as e:
                raise ConfigError(f"--seed_everything: {e}") from None
        if config and self.config.subcommand == "predict" and config["data"].get("predict_path"):
            # The images are read (and refused) before a model, a trainer or a run folder exists.
            load_predict_images(config["data"]["predict_path"])
        ckpt_path = config.get("ckpt_path") if config else None
        if ckpt_path and ckpt_path not in CKPT_KEYWORDS:
            check_checkpoint(ckpt_path, config, self.command_line)
        # How to test or predict is the user's choice even with a checkpoint: kept, and restored below.
        self.inference_options = {
            option: config["model"][option]
            for option in INFERENCE_OPTIONS
            if config and any(a.startswith(f"--model.{option}") for a in self.command_line)
        }

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        for option, value in self.inference_options.items():  # over the checkpoint's hyper-parameters
            config["model"][option] = value
        trainer = config["trainer"]
        logger_args = getattr(trainer.get("logger"), "init_args", None)  # None: no logger, or not one with a save_dir
        if logger_args is not None and "save_dir" in logger_args:
            # As in Lightning, --trainer.default_root_dir decides where a run writes, unless the logger is told.
            if trainer.get("default_root_dir") and logger_args["save_dir"] == DEFAULT_SAVE_DIR:
                logger_args["save_dir"] = trainer["default_root_dir"]
            check_output_place(logger_args["save_dir"], "output folder")
        # The packaged configs ask for bf16-mixed, which is 1.3-2x faster on CPUs with AVX-512 BF16 or AMX and on
        # GPUs, and about 10x slower where the CPU has to emulate it. A config file's bf16 therefore gives way to
        # fp32 on such a CPU; asked for on the command line, it is kept.
        if (
            str(trainer.get("precision")).startswith("bf16")
            and on_cpu(str(trainer.get("accelerator")))
            and not cpu_has_fast_bf16()
            and not any(a.startswith("--trainer.precision") for a in self.command_line)
        ):
            print(
                f"fmnist-pl: this CPU has no native bfloat16 (AVX-512 BF16 or AMX): training in 32-true instead of "
                f"{trainer['precision']} (--trainer.precision {trainer['precision']} keeps it)",
                file=sys.stderr,
            )
            trainer["precision"] = "32-true"
        if self.subcommand == "fit":  # the epoch rules, checked here once, before anything is built or written
            epochs, steps = trainer.get("max_epochs"), trainer.get("max_steps") or -1
            if epochs is not None and (epochs == 0 or epochs < -1):
                raise ConfigError(f"trainer.max_epochs must be ≥ 1 (or -1 for no limit), got {epochs}")
            if config["model"].get("lr_schedule") == "one_cycle" and epochs in (None, -1) and steps == -1:
                raise ConfigError(
                    "the one_cycle schedule needs a finite length: set --trainer.max_epochs (or --trainer.max_steps)"
                )


def add_tensorboard(trainer: L.Trainer) -> None:
    """TensorBoard event files beside the CSV log, in the same run folder, and the hyper-parameters with the
    validation accuracy at the end (HParams tab): `tensorboard --logdir outputs/latest` lists a pipeline run's
    trainings as <network>/seed-<s>/train, `--logdir outputs/runs` every CLI run. Not with loggers of the user's."""
    csv = next((logger for logger in trainer.loggers if isinstance(logger, CSVLogger)), None)
    if csv is None or any(isinstance(logger, TensorBoardLogger) for logger in trainer.loggers):
        return
    tensorboard = TensorBoardLogger(csv.save_dir, name=csv.name, version=csv.version, default_hp_metric=False)
    trainer.loggers = [*trainer.loggers, tensorboard]
    trainer.callbacks.append(HParamsSummary())


def check_checkpoint(ckpt_path: str, config: dict, command_line: list[str]) -> None:
    """The checkpoint exists, can be read and holds the network the config or options name; raises ConfigError.
    (Whether a resumed one-cycle schedule fits this run's epochs, the module checks as training starts.)"""
    if not Path(ckpt_path).is_file():
        raise ConfigError(f"checkpoint {ckpt_path} does not exist; pass a .ckpt file written by `fmnist-pl fit`")
    checkpoint = read_checkpoint(ckpt_path)
    asked, held = config["model"]["network"], checkpoint["hyper_parameters"]["network"]
    # A network named by a config file or an option other than the default must match the checkpoint's.
    default = inspect.signature(FashionMNISTClassifier).parameters["network"].default
    named = bool(config.get("config")) or asked != default or any(a.startswith("--model.network") for a in command_line)
    if named and asked != held:
        raise ConfigError(
            f"checkpoint {ckpt_path} holds a {held!r} network, not {asked!r}; pass that network's "
            f"config, or a checkpoint of {asked!r}"
        )


def data_seed(seed_everything: int | bool) -> int | None:
    """`seed_everything` as the data module's seed: None when it is true or false (a random seed, or none)."""
    return None if isinstance(seed_everything, bool) else seed_everything


def run_cli(argv: list[str] | None = None) -> None:
    """Run one Lightning CLI subcommand with the project's defaults (`argv` None: the command line)."""
    if argv is None:
        # Rewritten in place rather than passed as `args`: Lightning's DDP launcher re-runs sys.argv for each rank.
        sys.argv[1:] = resolve_config_names(sys.argv[1:])
    FashionMNISTCLI(
        FashionMNISTClassifier,
        FashionMNISTDataModule,
        trainer_class=FashionMNISTTrainer,
        args=None if argv is None else resolve_config_names(argv),
        seed_everything_default=0,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": DEFAULT_SAVE_DIR, "name": "runs"},
            },
            "callbacks": [LastCheckpoint()],  # listed here, so that `--trainer.callbacks` can replace it
        },
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            "exit_on_error": False,  # argument errors reach main(), which prints them in one line
            "epilog": "More commands: `fmnist-pl report RUN_DIR` rebuilds a pipeline run's report, "
            "`fmnist-pl export --ckpt_path CKPT` writes a checkpoint as an ONNX model with its card, and "
            "`fmnist-pl serve --model model.onnx` serves one over HTTP (each takes --help).",
        },
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of `fmnist-pl` and `python -m fmnist_pl`."""
    quiet_known_warnings()
    keep_freed_memory()
    args = sys.argv[1:] if argv is None else argv
    try:
        if args and args[0] == "report":
            from fmnist_pl.report import report_main

            report_main(args[1:])
        elif args and args[0] == "export":
            from fmnist_pl.export import export_main

            export_main(args[1:])
        elif args and args[0] == "serve":
            from fmnist_pl.serve import serve_main

            serve_main(args[1:])
        else:
            run_cli(argv)
    except (FmnistError, MisconfigurationException) as e:  # a bad option, file or machine: one line, no traceback
        print(f"fmnist-pl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # a full disk, a read-only or foreign folder: one line naming it; other errors are bugs
        # An error on an open file names no file: then name the run's output folder, where a run writes.
        save_dir = next(
            (
                a.split("=", 1)[1]
                for a in args
                if a.startswith(("--trainer.logger.init_args.save_dir=", "--trainer.default_root_dir="))
            ),
            DEFAULT_SAVE_DIR,
        )
        if (error := place_error(e, save_dir)) is None:
            raise
        print(f"fmnist-pl: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ArgumentError, pydantic.ValidationError) as e:  # the problem and where to look, not 80 lines of usage
        print(f"fmnist-pl: error: {one_line(e)}", file=sys.stderr)
        command = args[0] if args and not args[0].startswith("-") else "<command>"
        print(f"(`fmnist-pl {command} --help` lists every option)", file=sys.stderr)
        raise SystemExit(2) from None
