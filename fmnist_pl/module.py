"""The Lightning glue every network shares: loss (with the study's L2 penalty), optimizer, schedule and metrics.

Result files (history, confusion matrices, test metrics, predictions) are written by the callbacks in
`fmnist_pl.callbacks`; this module only computes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from fmnist_pl.errors import ConfigError, TrainingDiverged
from fmnist_pl.networks import NETWORKS

EVAL_SPLITS = ("val", "test")
NetworkName = Literal[tuple(NETWORKS)]  # type: ignore[valid-type]  # the registry's names: `fit --help` lists them


def read_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by `fmnist-pl fit`, checked: loadable, and its weights fit the current architecture of
    the network it names. Anything else is one ConfigError naming the file."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, random bytes, not a zip: torch raises many kinds of error for these
        raise ConfigError(
            f"checkpoint {path} is damaged or not a checkpoint ({type(e).__name__}); "
            "pass a .ckpt file written by `fmnist-pl fit`"
        ) from e
    network = checkpoint.get("hyper_parameters", {}).get("network") if isinstance(checkpoint, dict) else None
    if network not in NETWORKS or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {path} was not written by `fmnist-pl fit` (no network or weights in it)")
    weights = {k.removeprefix("network."): v for k, v in checkpoint["state_dict"].items() if k.startswith("network.")}
    try:
        NETWORKS[network](**(checkpoint["hyper_parameters"].get("network_options") or {})).load_state_dict(weights)
    except (RuntimeError, TypeError) as e:  # TypeError: options the current network no longer takes
        raise ConfigError(
            f"checkpoint {path}: its weights do not fit the current {network!r} architecture ({str(e).splitlines()[0]})"
        ) from e
    return checkpoint


class FashionMNISTClassifier(L.LightningModule):
    """Trains, validates, tests and predicts with any registered network."""

    def __init__(
        self,
        network: NetworkName = "cnn",
        network_options: dict[str, Any] | None = None,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        l2_penalty: float = 1e-3,
        adam_epsilon: float = 1e-7,
        lr_schedule: Literal["constant", "one_cycle"] = "constant",
        warmup_fraction: float = 0.3,
        label_smoothing: float = 0.0,
        test_time_flip: bool = False,
        ema_decay: float = 0.0,
        bias_lr_scale: float = 1.0,
    ) -> None:
        """Args:
        network: which registered architecture: `dense`, `cnn` (the study's) or `bn_cnn`.
        network_options: keyword arguments of that network's constructor, e.g. `{widths: [32, 64, 128]}` for
            `bn_cnn` (see its docstring in fmnist_pl/networks.py).
        optimizer: `adam` (the study), `adamw` (decoupled weight decay) or `sgd` (Nesterov momentum 0.9).
        learning_rate: the optimizer's learning rate (the peak rate under `one_cycle`).
        weight_decay: the optimizer's weight decay on weight matrices and kernels (never biases or BatchNorm).
        l2_penalty: Keras-style L2 coefficient: the loss gets l2_penalty * sum(W**2) over the network's penalized
            kernels (the study's regularizer; 0 for none).
        adam_epsilon: Adam's epsilon; 1e-7 is Keras' default (PyTorch's is 1e-8).
        lr_schedule: `constant` (the study) or `one_cycle` (warm-up then cosine decay, stepped per batch).
        warmup_fraction: under `one_cycle`, the share of all steps spent warming up to the peak rate.
        label_smoothing: cross-entropy label smoothing for training (0 = none, as the study).
        test_time_flip: in `test` and `predict`, average the class probabilities of each image and its mirror
            image (flip test-time augmentation); `test` reports the accuracy with and without it.
        ema_decay: keep an exponential moving average of the weights (and BatchNorm statistics) with this decay per
            step (0 = none). The averaged weights are the ones validated, checkpointed, tested and predicted with.
        bias_lr_scale: learning-rate multiplier for biases and BatchNorm parameters (airbench trains them faster).
        """
        super().__init__()
        if network not in NETWORKS:
            raise ConfigError(f"unknown network {network!r}: choose one of {', '.join(NETWORKS)}")
        if learning_rate <= 0:
            raise ConfigError(f"model.learning_rate must be > 0, got {learning_rate}")
        for name, value in (("l2_penalty", l2_penalty), ("weight_decay", weight_decay)):
            if value < 0:
                raise ConfigError(f"model.{name} must be ≥ 0, got {value}")
        if adam_epsilon <= 0:
            raise ConfigError(f"model.adam_epsilon must be > 0, got {adam_epsilon}")
        if not 0 < warmup_fraction < 1:
            raise ConfigError(f"model.warmup_fraction must be in (0, 1), got {warmup_fraction}")
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")
        if not 0 <= ema_decay < 1:
            raise ConfigError(f"model.ema_decay must be in [0, 1), got {ema_decay}")
        if bias_lr_scale <= 0:
            raise ConfigError(f"model.bias_lr_scale must be > 0, got {bias_lr_scale}")
        self.save_hyperparameters()
        try:
            self.network = NETWORKS[network](**(network_options or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.network_options {network_options} do not fit network {network!r}: {e}") from e
        self.example_input_array = torch.zeros(1, 1, 28, 28)  # lets Lightning's summary show shapes and FLOPs
        # Inputs are ours and well-formed, so torchmetrics' per-update argument checks are skipped.
        self.loss = {split: MeanMetric() for split in EVAL_SPLITS}
        self.accuracy = {split: MulticlassAccuracy(10, average="micro", validate_args=False) for split in EVAL_SPLITS}
        self.confusion = {split: MulticlassConfusionMatrix(10, validate_args=False) for split in EVAL_SPLITS}
        self.accuracy_without_flip = MulticlassAccuracy(10, average="micro", validate_args=False)  # test, with TTA on
        # Registered as modules so they move with the model to the device and sync across ranks.
        self.metrics = torch.nn.ModuleDict(
            {
                f"{kind}_{split}": m
                for kind, d in (("loss", self.loss), ("acc", self.accuracy), ("cm", self.confusion))
                for split, m in d.items()
            }
            | {"acc_test_without_flip": self.accuracy_without_flip}
        )
        # The last finished evaluation epoch per split (loss, accuracy, confusion matrix), for the result writers.
        self.epoch_results: dict[str, dict] = {}
        self.epoch_started = 0.0
        # Training-epoch sums (loss × images, correct, images): three in-place adds per step instead of metric
        # objects and per-step logging. Reduced across ranks once per epoch.
        self.register_buffer("train_loss_sum", torch.zeros(()), persistent=False)
        self.register_buffer("train_correct", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("train_images", torch.zeros((), dtype=torch.int64), persistent=False)
        self._train_epoch: tuple[int, float, float] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)

    def setup(self, stage: str) -> None:
        # Layers computed from the training images (bn_cnn's whitening filters) are set before the first step. A
        # resumed fit then loads its checkpoint over them, which Lightning does after this hook.
        fit_to_data = getattr(self.network, "fit_to_data", None)
        if stage != "fit" or fit_to_data is None or not hasattr(self.trainer.datamodule, "train_images_sample"):
            return
        fit_to_data(self.trainer.datamodule.train_images_sample(5_000))
        for parameter in self.network.parameters():  # every rank starts from rank 0's data-derived filters
            if not parameter.requires_grad:
                parameter.data.copy_(self.trainer.strategy.broadcast(parameter.data, src=0))

    def configure_callbacks(self) -> list[Callback]:
        if self.hparams.ema_decay == 0 or self.trainer.state.fn != "fit":  # test and predict load averaged weights
            return []
        # Lightning's averaging callback swaps the averaged weights in for validation and writes them as the
        # checkpoint's weights, so best.ckpt, test and predict all use the averaged network.
        return [EMAWeightAveraging(decay=self.hparams.ema_decay)]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # Batches are already CPU tensors; skipping Lightning's generic walk saves a measurable part of a CPU step.
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def l2_term(self) -> torch.Tensor | float:
        """Keras' kernel_regularizer=l2(c): c * sum(W**2) for each penalized weight matrix (never biases)."""
        weights = self.network.penalized_weights()
        if not weights or self.hparams.l2_penalty == 0:
            return 0.0
        return self.hparams.l2_penalty * sum(w.pow(2).sum() for w in weights)

    def class_probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(plain logits, class probabilities): the probabilities average the mirror image's under test_time_flip."""
        logits = self(images)
        probabilities = logits.float().softmax(dim=1)
        if self.hparams.test_time_flip:
            probabilities = (probabilities + self(images.flip(-1)).float().softmax(dim=1)) / 2
        return logits, probabilities

    def evaluation_step(self, batch: tuple[torch.Tensor, torch.Tensor], split: str) -> dict[str, torch.Tensor] | None:
        """Cross-entropy and metric updates for one validation or test batch; a test batch also returns its
        predictions, as `predict_step` would (`evaluate` writes them: one pass over the test set)."""
        images, labels = batch
        probabilities = None
        if split == "test":
            logits, probabilities = self.class_probabilities(images)
            confidence, preds = probabilities.max(dim=1)
            if self.hparams.test_time_flip:
                self.accuracy_without_flip.update(logits.argmax(dim=1), labels)
        else:  # model selection never uses test-time augmentation
            logits = self(images)
            preds = logits.argmax(dim=1)
        loss = F.cross_entropy(logits.float(), labels)
        # Weighted by batch size so the epoch value is the exact per-image mean, on any number of devices.
        self.loss[split].update(loss.detach(), weight=len(labels))
        self.accuracy[split].update(preds, labels)
        self.confusion[split].update(preds, labels)
        self.log(f"{split}/loss", self.loss[split], on_step=False, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}/acc", self.accuracy[split], on_step=False, on_epoch=True, prog_bar=True)
        if probabilities is None:
            return None
        return {"label": labels, "predicted": preds, "confidence": confidence, "probabilities": probabilities}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        data_loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        # Report the plain cross-entropy, comparable across label-smoothing settings and with the study.
        plain = data_loss.detach() if self.hparams.label_smoothing == 0 else F.cross_entropy(logits.detach(), labels)
        self.train_loss_sum.add_(plain.float(), alpha=len(labels))
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
        self.evaluation_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return self.evaluation_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        images, labels = batch
        _, probabilities = self.class_probabilities(images)
        confidence, predicted = probabilities.max(dim=1)
        return {"label": labels, "predicted": predicted, "confidence": confidence, "probabilities": probabilities}

    def on_train_start(self) -> None:
        # A run resumed with another epoch count would follow the old one-cycle schedule (restored from the
        # checkpoint) and crash when it runs past the end: stop before the first step instead.
        for config in self.trainer.lr_scheduler_configs:
            planned, now = getattr(config.scheduler, "total_steps", None), self.trainer.estimated_stepping_batches
            if planned is not None and planned != now:
                raise ConfigError(
                    f"this checkpoint's one_cycle schedule was planned for {planned} steps, this run has {now}: "
                    "resume with the epoch count it was started with, or start afresh without --ckpt_path"
                )

    def on_train_epoch_start(self) -> None:
        self.epoch_started = time.perf_counter()
        for total in (self.train_loss_sum, self.train_correct, self.train_images):
            total.zero_()

    def on_train_epoch_end(self) -> None:
        loss, accuracy = self.train_epoch_results()
        self.log_dict({"train/loss": loss, "train/acc": accuracy}, prog_bar=True)  # already reduced over ranks
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])  # the peak-scaled rate under one_cycle
        # Training plus this epoch's validation: what a user waits for per epoch.
        self.log("epoch_seconds", time.perf_counter() - self.epoch_started, reduce_fx="max", sync_dist=True)

    def _finish_evaluation_epoch(self, split: str) -> None:
        # compute() syncs across ranks, so every rank takes part; the writers then only read the results.
        matrix = self.confusion[split].compute()
        self.confusion[split].reset()
        self.epoch_results[split] = {
            "loss": self.loss[split].compute().item(),
            "accuracy": self.accuracy[split].compute().item(),
            "confusion": matrix.cpu(),
        }
        if split == "test" and self.hparams.test_time_flip:
            self.epoch_results[split]["accuracy_without_flip"] = self.accuracy_without_flip.compute().item()
            self.accuracy_without_flip.reset()

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation_epoch("val")
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # Here, before the checkpoint callbacks save this epoch: a diverged epoch never becomes best.ckpt.
            self.stop_if_diverged()

    def stop_if_diverged(self) -> None:
        """Stop training whose loss is not finite, or exploded: a training loss over 10 times that of a uniform
        guess (ln 10) while validation accuracy is at chance. Below that, a high but falling loss may recover."""
        train_loss, _ = self.train_epoch_results()  # the same on every rank, so every rank stops together
        val = self.epoch_results["val"]
        exploded = train_loss > 10 * math.log(10) and val["accuracy"] < 0.2
        if math.isfinite(train_loss) and math.isfinite(val["loss"]) and not exploded:
            return
        raise TrainingDiverged(
            f"training diverged in epoch {self.current_epoch + 1}: training loss {train_loss:.4g}, validation loss "
            f"{val['loss']:.4g}, accuracy {val['accuracy']:.1%}; lower --model.learning_rate (now "
            f"{self.hparams.learning_rate:g}) or check the data"
        )

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation_epoch("test")
        # Each image counted once across ranks: the confusion matrix is already the sum over ranks.
        self.log("test/images", self.epoch_results["test"]["confusion"].sum().float(), reduce_fx="max")

    def configure_optimizers(self) -> torch.optim.Optimizer | dict:
        hp = self.hparams
        # Weight decay on weight matrices and kernels only: decaying biases and BatchNorm scales only hurts.
        trained = [p for p in self.parameters() if p.requires_grad]  # not frozen whitening filters or BN scales
        decayed = [p for p in trained if p.ndim > 1]
        others = [p for p in trained if p.ndim <= 1]
        groups = [
            {"params": decayed, "weight_decay": hp.weight_decay, "lr": hp.learning_rate},
            {"params": others, "weight_decay": 0.0, "lr": hp.learning_rate * hp.bias_lr_scale},
        ]
        # fused: the same update in one kernel; on 2 CPU cores it takes the dense net's step from 27 to 16 ms.
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=hp.learning_rate, momentum=0.9, nesterov=True, fused=True)
        else:
            adam = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
            optimizer = adam(groups, lr=hp.learning_rate, eps=hp.adam_epsilon, fused=True)
        if hp.lr_schedule == "constant":
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ConfigError("the one_cycle schedule needs a finite length: set --trainer.max_epochs")
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in groups], total_steps=total_steps, pct_start=hp.warmup_fraction
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
