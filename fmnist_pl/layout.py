"""The run layout: every folder and file that the CLI, the pipeline and the report share, named in one place.

outputs/<run id>/run.json, report.md, report.html, summary.json, figures/, tables/
outputs/<run id>/<network>/seed-<seed>/train    -> ../../../steps/train-<network>-seed<seed>-<key>/    (a TrainingFolder)
outputs/<run id>/<network>/seed-<seed>/evaluate -> ../../../steps/evaluate-<network>-seed<seed>-<key>/ (an EvaluationFolder)
outputs/<run id>/export/<network>       -> ../../steps/export-<network>-seed<first seed>-<key>/ (model.onnx, model.json, README.md)
outputs/latest -> <run id>
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Files a CLI run folder holds (`fmnist-pl fit|test|predict` write them into their log dir).
HISTORY = "history.csv"
BEST_CHECKPOINT = "checkpoints/best.ckpt"
LAST_CHECKPOINT = "checkpoints/last.ckpt"
TEST_METRICS = "test_metrics.json"
PREDICTIONS = "predictions.csv"  # `fmnist-pl predict`'s
# What `fmnist-pl export` writes into its folder (export/ beside checkpoints/, or a run's export/<network>/).
EXPORT_DIR = "export"
ONNX_MODEL = "model.onnx"
MODEL_DESCRIPTION = "model.json"
MODEL_CARD = "README.md"
# A fit's one console line per epoch, "[network] epoch k/n: ...": the pipeline forwards these lines of a step's output
# to its own log.
EPOCH_LINE_PREFIX = "["


def predictions_file(split: str) -> str:
    """`predictions_test.csv`, `predictions_train.csv`: `fmnist-pl evaluate`'s predictions of a split."""
    return f"predictions_{split}.csv"


def confusion_matrix_file(split: str) -> str:
    """`confusion_matrix_val.csv` / `confusion_matrix_test.csv`: rows true class, columns predicted."""
    return f"confusion_matrix_{split}.csv"


def file_in_folder(name: str) -> property:
    """A folder's file or subfolder `name`, as a read-only attribute: `TrainingFolder(p).history` is p/history.csv."""
    return property(lambda folder: folder.path / name, doc=f"<folder>/{name}")


@dataclass(frozen=True)
class TrainingFolder:
    """A pipeline training step: one `fmnist-pl fit` run folder plus its log."""

    path: Path
    history = file_in_folder(HISTORY)
    best_checkpoint = file_in_folder(BEST_CHECKPOINT)
    last_checkpoint = file_in_folder(LAST_CHECKPOINT)
    log = file_in_folder("train.log")


@dataclass(frozen=True)
class EvaluationFolder:
    """A pipeline evaluation step: one `fmnist-pl evaluate` run folder plus its log."""

    path: Path
    test_metrics = file_in_folder(TEST_METRICS)
    confusion_test = file_in_folder(confusion_matrix_file("test"))
    log = file_in_folder("evaluate.log")

    def predictions(self, split: str) -> Path:
        """`fmnist-pl evaluate`'s predictions of `split` (test or train)."""
        return self.path / predictions_file(split)


@dataclass(frozen=True)
class RunFolder:
    """One pipeline run: its record, report and a train/evaluate link pair per network."""

    path: Path
    record = file_in_folder("run.json")
    figures = file_in_folder("figures")
    tables = file_in_folder("tables")
    summary = file_in_folder("summary.json")

    def report(self, suffix: str) -> Path:
        """report.md, report.html; summary.json is `summary`."""
        return self.path / f"report{suffix}"

    def training(self, network: str, seed: int) -> TrainingFolder:
        return TrainingFolder(self.path / network / f"seed-{seed}" / "train")

    def evaluation(self, network: str, seed: int) -> EvaluationFolder:
        return EvaluationFolder(self.path / network / f"seed-{seed}" / "evaluate")

    def export(self, network: str) -> Path:
        """The run's export of `network` (its first seed's best checkpoint): model.onnx, model.json, README.md."""
        return self.path / EXPORT_DIR / network


def step_name(step: str, network: str, seed: int) -> str:
    """A step's name in run.json and the Prefect UI: `train-cnn-seed0`."""
    return f"{step}-{network}-seed{seed}"


def step_folder(steps_dir: Path, step: str, network: str, seed: int, key: str) -> Path:
    """A cached step's folder: <steps dir>/<step>-<network>-seed<seed>-<key>."""
    return steps_dir / f"{step_name(step, network, seed)}-{key}"


STEPS_DIR = "steps"
LATEST = "latest"
