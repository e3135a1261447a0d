"""The Lightning glue shared by both networks: loss with the study's L2 penalty, Adam, metrics, result files."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Literal

import lightning as L
import pandas as pd
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from fmnist_pl.data import CLASS_NAMES
from fmnist_pl.errors import ConfigError
from fmnist_pl.io import atomic_write, write_text_atomic
from fmnist_pl.networks import NETWORKS, count_trainable_parameters

EVAL_SPLITS = ("val", "test")
# PredictionsWriter needs no batch indices (ShardedBatches keeps the input order), so Lightning's note is moot.
warnings.filterwarnings("ignore", message=r".*Couldn't infer the batch indices.*")
# The module's transfer_batch_to_device is meant to win over the data module's (which has none of its own).
warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device` in `LightningModule`.*")


def write_confusion_matrix(matrix: torch.Tensor, path: Path) -> None:
    """Write a confusion matrix as CSV: rows are true classes, columns predicted, both labelled by class name."""
    frame = pd.DataFrame(matrix.cpu().numpy(), index=CLASS_NAMES, columns=CLASS_NAMES)
    frame.index.name = "true \\ predicted"
    with atomic_write(path) as tmp:
        frame.to_csv(tmp)


def run_dir(trainer: L.Trainer) -> Path | None:
    """The run's folder. Call on every rank: under DDP `trainer.log_dir` is a broadcast, a collective."""
    log_dir = trainer.log_dir
    return Path(log_dir) if log_dir else None


class FashionMNISTClassifier(L.LightningModule):
    """Trains, validates, tests and predicts with one of the study's networks."""

    def __init__(
        self,
        network: str = "cnn",
        learning_rate: float = 1e-3,
        l2_penalty: float = 1e-3,
        adam_epsilon: float = 1e-7,
        lr_schedule: Literal["constant", "one_cycle"] = "constant",
        label_smoothing: float = 0.0,
    ) -> None:
        """Args:
        network: which architecture: `dense` (SeedDenseNet) or `cnn` (SeedCNN).
        learning_rate: Adam's learning rate (the peak rate under `one_cycle`).
        l2_penalty: Keras-style L2 coefficient: the loss gets l2_penalty * sum(W**2) over the penalized kernels.
        adam_epsilon: Adam's epsilon; 1e-7 is Keras' default (PyTorch's is 1e-8).
        lr_schedule: `constant` (the study) or `one_cycle` (warm-up then cosine decay, stepped per batch).
        label_smoothing: cross-entropy label smoothing for training (0 = none, as the study).
        """
        super().__init__()
        if network not in NETWORKS:
            raise ConfigError(f"unknown network {network!r}: choose one of {', '.join(NETWORKS)}")
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate must be > 0, got {learning_rate}")
        if l2_penalty < 0 or adam_epsilon <= 0:
            raise ConfigError(f"model.l2_penalty must be ≥ 0 and adam_epsilon > 0, got {l2_penalty}, {adam_epsilon}")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.save_hyperparameters()
        self.network = NETWORKS[network]()
        self.example_input_array = torch.zeros(1, 1, 28, 28)  # lets Lightning's summary show shapes and FLOPs
        # Inputs are ours and well-formed, so torchmetrics' per-update argument checks are skipped.
        self.loss = {split: MeanMetric() for split in EVAL_SPLITS}
        self.accuracy = {split: MulticlassAccuracy(10, average="micro", validate_args=False) for split in EVAL_SPLITS}
        self.confusion = {split: MulticlassConfusionMatrix(10, validate_args=False) for split in EVAL_SPLITS}
        # Registered as modules so they move with the model to the device and sync across ranks.
        self.metrics = torch.nn.ModuleDict(
            {f"{kind}_{split}": m for kind, d in (("loss", self.loss), ("acc", self.accuracy), ("cm", self.confusion))
             for split, m in d.items()}
        )  # fmt: skip
        self._epoch_started = 0.0
        # Training-epoch sums (loss × images, correct, images): three in-place adds per step instead of metric
        # objects and per-step logging, which cost more than 3 % of a small network's step. Reduced across ranks
        # per epoch. In place because `+=` on a module attribute goes through nn.Module's slow __setattr__;
        # three scalars because building one vector per step (stack, full_like) took twice as long.
        self.register_buffer("train_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("train_correct", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("train_images", torch.zeros((), dtype=torch.int64), persistent=False)
        self._train_epoch: tuple[int, float, float] | None = None
        # One row per finished epoch. Kept in the checkpoint (see on_save_checkpoint), so a resumed run
        # continues the same table: CSVLogger, by contrast, deletes metrics.csv when a run resumes in its folder.
        self.history: list[dict[str, float]] = []

    def __setattr__(self, name: str, value: object) -> None:
        # Lightning sets `_current_fx_name` around every hook call, about 40 times per training step. It is a plain
        # string, never a parameter, buffer or module, so nn.Module.__setattr__'s checks (~3 % of a batch-32 CNN
        # step on 2 CPU cores) can be skipped: object.__setattr__ does what they would end up doing.
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):  # noqa: ANN001, ANN201
        # Batches are already CPU tensors; skipping Lightning's generic walk saves a measurable part of a CPU step.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def l2_term(self) -> torch.Tensor:
        """Keras' kernel_regularizer=l2(c): c * sum(W**2) for each penalized weight matrix (never biases)."""
        return self.hparams.l2_penalty * sum(w.pow(2).sum() for w in self.network.penalized_weights())

    def model_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> None:
        """Cross-entropy on logits and metric updates for one evaluation batch of `split`."""
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        preds = logits.argmax(dim=1)
        # Weighted by batch size so the epoch value is the exact per-image mean, on any number of devices.
        self.loss[split].update(loss.detach(), weight=len(labels))
        self.accuracy[split].update(preds, labels)
        if split in self.confusion:
            self.confusion[split].update(preds, labels)
        self.log(f"{split}/loss", self.loss[split], on_step=False, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}/acc", self.accuracy[split], on_step=False, on_epoch=True, prog_bar=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        data_loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        # Report the plain cross-entropy, comparable across label-smoothing settings and with the study.
        # Detached values rather than a no_grad block: the same result, a few microseconds less per step.
        plain = data_loss.detach() if self.hparams.label_smoothing == 0 else F.cross_entropy(logits.detach(), labels)
        self.train_loss_sum.add_(plain, alpha=len(labels))
        self.train_correct.add_((logits.detach().argmax(dim=1) == labels).sum())
        self.train_images.add_(len(labels))  # on the batch's device: no host sync
        return data_loss + self.l2_term()

    def train_epoch_results(self) -> tuple[float, float]:
        """This epoch's training (loss, accuracy) over all ranks; reduces once per epoch (call on every rank)."""
        if self._train_epoch is None or self._train_epoch[0] != self.current_epoch:
            totals = torch.stack((self.train_loss_sum, self.train_correct.float(), self.train_images.float()))
            loss_sum, correct, images = self.trainer.strategy.reduce(totals, reduce_op="sum").tolist()
            self._train_epoch = (self.current_epoch, loss_sum / max(images, 1), correct / max(images, 1))
        return self._train_epoch[1:]

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.model_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels = batch
        probabilities = self(images).softmax(dim=1)
        confidence, predicted = probabilities.max(dim=1)
        return {"label": labels, "predicted": predicted, "confidence": confidence, "probabilities": probabilities}

    def on_train_epoch_start(self) -> None:
        self._epoch_started = time.perf_counter()
        for total in (self.train_loss_sum, self.train_correct, self.train_images):
            total.zero_()

    def on_train_epoch_end(self) -> None:
        loss, accuracy = self.train_epoch_results()
        self.log_dict({"train/loss": loss, "train/acc": accuracy}, prog_bar=True)  # already reduced over ranks
        # Training plus this epoch's validation: what a user waits for per epoch.
        seconds = time.perf_counter() - self._epoch_started
        self.log("epoch_seconds", seconds, reduce_fx="max", sync_dist=True)  # the slowest rank

    def on_validation_epoch_end(self) -> None:
        matrix = self.confusion["val"].compute()  # every rank takes part in the sync
        self.confusion["val"].reset()
        directory = run_dir(self.trainer)
        if self.trainer.sanity_checking or not directory:
            return
        if self.trainer.state.fn == "fit":
            # Here, not in the module's on_train_epoch_end: the checkpoint callbacks save in their own
            # on_train_epoch_end, which Lightning runs before the module's, and the checkpoint must hold this row.
            # Validation runs after the epoch's last training batch, so the training totals are complete here.
            train_loss, train_accuracy = self.train_epoch_results()
            self.history.append(
                {
                    "epoch": self.current_epoch,
                    "train/loss": train_loss,
                    "train/acc": train_accuracy,
                    "val/loss": self.loss["val"].compute().item(),
                    "val/acc": self.accuracy["val"].compute().item(),
                    "lr": self.trainer.optimizers[0].param_groups[0]["lr"],
                    "epoch_seconds": time.perf_counter() - self._epoch_started,
                }
            )
        if not self.trainer.is_global_zero:
            return
        write_confusion_matrix(matrix, directory / "confusion_matrix_val.csv")
        if self.trainer.state.fn == "fit":
            with atomic_write(directory / "history.csv") as tmp:
                pd.DataFrame(self.history).to_csv(tmp, index=False)
            row = self.history[-1]
            print(
                f"[{self.hparams.network}] epoch {row['epoch'] + 1}/{self.trainer.max_epochs}: "
                f"train loss {row['train/loss']:.4f} acc {row['train/acc']:.4f} | "
                f"val loss {row['val/loss']:.4f} acc {row['val/acc']:.4f} | {row['epoch_seconds']:.1f} s",
                flush=True,
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["epoch_history"] = self.history

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("epoch_history", []))

    def on_test_epoch_end(self) -> None:
        matrix = self.confusion["test"].compute()
        self.confusion["test"].reset()
        self.log("test/images", matrix.sum().float(), reduce_fx="max")  # each image counted once across ranks
        loss = self.loss["test"].compute().item()
        directory = run_dir(self.trainer)
        if not self.trainer.is_global_zero or not directory:
            return
        directory.mkdir(parents=True, exist_ok=True)
        write_confusion_matrix(matrix, directory / "confusion_matrix_test.csv")
        correct = matrix.diag().sum().item()
        metrics = {
            "network": self.hparams.network,
            "accuracy": correct / matrix.sum().item(),
            "loss": loss,
            "images": int(matrix.sum().item()),
            "trainable_parameters": count_trainable_parameters(self.network),
            "checkpoint": self.trainer.ckpt_path,
            "devices": self.trainer.world_size,
        }
        write_text_atomic(directory / "test_metrics.json", json.dumps(metrics, indent=2) + "\n")

    def configure_optimizers(self):  # noqa: ANN201 - Lightning accepts several return shapes
        # fused: the same Adam update in one kernel; on 2 CPU cores it takes the dense net's step from 27 to 16 ms.
        optimizer = torch.optim.Adam(
            self.parameters(), lr=self.hparams.learning_rate, eps=self.hparams.adam_epsilon, fused=True
        )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.learning_rate, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class LastCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """`last.ckpt`, rewritten after every epoch: what an interrupted run resumes from.

    ModelCheckpoint(save_last=True) is not that: in Lightning 2.6 it rewrites last.ckpt only when a best
    checkpoint is saved too, so after the last improvement it stops following the run.
    """

    def __init__(self) -> None:
        super().__init__(filename="last", monitor=None, save_top_k=1, enable_version_counter=False)


class PredictionsWriter(L.pytorch.callbacks.BasePredictionWriter):
    """Writes `predict` results to <run dir>/predictions.csv: true label (-1 if unknown), prediction, confidence."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:  # noqa: ANN001
        directory = run_dir(trainer)
        if not directory:
            return
        directory.mkdir(parents=True, exist_ok=True)
        columns = {key: torch.cat([p[key] for p in predictions]).cpu() for key in predictions[0]}
        frame = pd.DataFrame(
            {"label": columns["label"], "predicted": columns["predicted"], "confidence": columns["confidence"]}
        )
        for i, name in enumerate(CLASS_NAMES):
            frame[f"p_{name}"] = columns["probabilities"][:, i]
        # Each rank classified a contiguous shard; shards in rank order are the input order.
        shard = directory / f".predictions.rank{trainer.global_rank}.csv"
        frame.to_csv(shard, index=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            shards = [directory / f".predictions.rank{r}.csv" for r in range(trainer.world_size)]
            merged = pd.concat([pd.read_csv(s) for s in shards], ignore_index=True)
            merged.index.name = "index"
            with atomic_write(directory / "predictions.csv") as tmp:
                merged.to_csv(tmp)
            for s in shards:
                s.unlink()
        trainer.strategy.barrier()
