"""What a run writes, as Lightning callbacks: the epoch history, confusion matrices, test metrics, predictions,
and the checkpoint an interrupted fit resumes from. Every file is written atomically by rank 0 alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from fmnist_pl import layout
from fmnist_pl.fashion_mnist import CLASS_NAMES
from fmnist_pl.io import atomic_write, write_text_atomic
from fmnist_pl.networks import count_trainable_parameters, forward_flops


def run_dir(trainer: L.Trainer) -> Path | None:
    """The run's folder. Call on every rank: under DDP `trainer.log_dir` is a broadcast, a collective."""
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir else None


def write_confusion_matrix(matrix: torch.Tensor, path: Path) -> None:
    """Write a confusion matrix as CSV: rows are true classes, columns predicted, both labelled by class name."""
    frame = pd.DataFrame(matrix.cpu().numpy(), index=CLASS_NAMES, columns=CLASS_NAMES)
    frame.index.name = "true \\ predicted"
    with atomic_write(path) as tmp:
        frame.to_csv(tmp)


class EpochHistory(Callback):
    """history.csv, one row per epoch (train/val loss and accuracy, learning rate, seconds), and one console line.

    The rows travel inside the checkpoint (this callback's state), so a resumed run continues the same table:
    CSVLogger, by contrast, deletes metrics.csv when a run resumes in its folder. Written at the end of
    validation, which Lightning runs before the checkpoint callbacks save at the end of the training epoch; the
    training epoch's loss and accuracy are logged only after that, so they come from the module's epoch totals.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.epoch_started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Training plus this epoch's validation: what a user waits for per epoch.
        seconds = time.perf_counter() - self.epoch_started
        pl_module.log("epoch_seconds", seconds, reduce_fx="max", sync_dist=True)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = run_dir(trainer)  # every rank: a collective under DDP
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        train_loss, train_accuracy = pl_module.train_epoch_results()  # every rank: a reduction
        self.rows.append(
            {
                "epoch": trainer.current_epoch,
                "train/loss": train_loss,
                "train/acc": train_accuracy,
                "val/loss": float(trainer.callback_metrics["val/loss"]),
                "val/acc": float(trainer.callback_metrics["val/acc"]),
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "epoch_seconds": time.perf_counter() - self.epoch_started,
            }
        )
        if not trainer.is_global_zero or directory is None:
            return
        with atomic_write(directory / layout.HISTORY) as tmp:
            pd.DataFrame(self.rows).to_csv(tmp, index=False)
        row = self.rows[-1]
        print(
            f"{layout.EPOCH_LINE_PREFIX}{pl_module.hparams.network}] epoch {row['epoch'] + 1}/{trainer.max_epochs}: "
            f"train loss {row['train/loss']:.4f} acc {row['train/acc']:.4f} | "
            f"val loss {row['val/loss']:.4f} acc {row['val/acc']:.4f} | {row['epoch_seconds']:.1f} s",
            flush=True,
        )

    def state_dict(self) -> dict:
        return {"rows": self.rows}

    def load_state_dict(self, state_dict: dict) -> None:
        self.rows = list(state_dict.get("rows", []))


class HParamsSummary(Callback):
    """At the end of a fit, the run's hyper-parameters with its best and last validation accuracy, for
    TensorBoard's HParams tab, which compares runs by them (Lightning logs the hyper-parameters without metrics)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
        last = trainer.callback_metrics.get("val/acc")
        metrics = {name: float(v) for name, v in (("hp/best_val_acc", best), ("hp/val_acc", last)) if v is not None}
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and metrics:
                # The epoch count is the Trainer's, not the module's; "_instantiator" is LightningCLI's bookkeeping.
                params = {k: v for k, v in logger.hparams.items() if k != "_instantiator"}
                logger.log_hyperparams({**params, "max_epochs": trainer.max_epochs}, metrics)


class EvaluationFiles(Callback):
    """confusion_matrix_val.csv after each validation; after `test`, confusion_matrix_test.csv and
    test_metrics.json: accuracy (with and without flip TTA), loss, images, parameters, FLOPs, throughput."""

    def __init__(self) -> None:
        self._test_started = 0.0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = run_dir(trainer)
        if trainer.sanity_checking:
            return
        matrix = pl_module.confusion_matrix("val")  # every rank: it syncs
        if trainer.is_global_zero and directory is not None:
            write_confusion_matrix(matrix, directory / layout.confusion_matrix_file("val"))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_started = time.perf_counter()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._test_started
        directory = run_dir(trainer)
        matrix = pl_module.confusion_matrix("test")  # every rank: it syncs
        if not trainer.is_global_zero or directory is None:
            return
        logged = trainer.callback_metrics
        directory.mkdir(parents=True, exist_ok=True)
        write_confusion_matrix(matrix, directory / layout.confusion_matrix_file("test"))
        images = int(matrix.sum().item())
        accuracy = matrix.diag().sum().item() / images
        flip = pl_module.hparams.test_time_flip
        metrics = {
            "network": pl_module.hparams.network,
            "accuracy": accuracy,
            "test_time_flip": flip,
            "accuracy_without_flip": float(logged["test/acc_without_flip"]) if flip else accuracy,
            "loss": float(logged["test/loss"]),
            "images": images,
            "trainable_parameters": count_trainable_parameters(pl_module.network),
            "flops_per_image": forward_flops(pl_module.network),
            "test_images_per_second": round(images / seconds),
            "accelerator": trainer.accelerator.__class__.__name__.removesuffix("Accelerator").lower(),
            "precision": trainer.precision,
            "checkpoint": trainer.ckpt_path,
            "devices": trainer.world_size,
        }
        write_text_atomic(directory / layout.TEST_METRICS, json.dumps(metrics, indent=2) + "\n")


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt`, rewritten after every epoch: what an interrupted run resumes from.

    ModelCheckpoint(save_last=True) is not that: in Lightning 2.6 it rewrites last.ckpt only when a best
    checkpoint is saved too, so after the last improvement it stops following the run.
    """

    def __init__(self) -> None:
        super().__init__(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


def write_predictions(trainer: L.Trainer, predictions: list[dict], path: Path) -> None:
    """Write one rank's predictions (dicts of label, predicted, confidence, probabilities per batch) and, on rank 0,
    merge every rank's into `path`: one row per image, true label (-1 if unknown), prediction, confidence and one
    probability column per class. Call on every rank (it waits for the others)."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    columns = {key: torch.cat([p[key] for p in predictions]).cpu() for key in predictions[0]}
    frame = pd.DataFrame(
        {"label": columns["label"], "predicted": columns["predicted"], "confidence": columns["confidence"]}
    )
    frame.insert(0, "predicted_class", [CLASS_NAMES[k] for k in frame["predicted"]])
    for i, name in enumerate(CLASS_NAMES):
        frame[f"p_{name}"] = columns["probabilities"][:, i]
    # Each rank classified a contiguous shard; shards in rank order are the input order.
    shard = directory / f".predictions.rank{trainer.global_rank}.csv"
    frame.to_csv(shard, index=False)
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        shards = [directory / f".predictions.rank{r}.csv" for r in range(trainer.world_size)]
        merged = pd.concat([pd.read_csv(s) for s in shards], ignore_index=True)
        merged.index.name = "index"  # the image's position in the input: its IDX index, or its file in name order
        names = getattr(trainer.datamodule, "predict_names", None) if trainer.predicting else None
        if names is not None:
            merged.insert(0, "file", names)
        with atomic_write(path) as tmp:
            merged.to_csv(tmp)
        for s in shards:
            s.unlink()
        print(f"predictions of {len(merged):,} images written to {path}")
    trainer.strategy.barrier()


class PredictionsWriter(BasePredictionWriter):
    """Writes `predict` results to <run dir>/predictions.csv (`evaluate`'s: predictions_<split>.csv)."""

    def __init__(self, name_by_split: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.name_by_split = name_by_split

    def write_on_epoch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: list, batch_indices: list | None
    ) -> None:
        directory = run_dir(trainer)
        if not directory:
            return
        split = trainer.datamodule.hparams.predict_split if self.name_by_split else None
        write_predictions(
            trainer, predictions, directory / (layout.predictions_file(split) if split else layout.PREDICTIONS)
        )


class TestPredictions(Callback):
    """`evaluate`'s predictions_test.csv, from `test`'s own forward passes (each test batch's step returns its
    predictions): the test set is classified once, not once for the metrics and again by `predict`."""

    def __init__(self) -> None:
        self.batches: list[dict] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.batches = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: dict,
        batch: object,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self.batches.append({key: value.cpu() for key, value in outputs.items()})

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = run_dir(trainer)  # every rank: a collective under DDP
        if directory is not None and self.batches:
            write_predictions(trainer, self.batches, directory / layout.predictions_file("test"))
