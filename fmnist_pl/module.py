"""The Lightning glue every network shares: loss (with the study's L2 penalty), optimizer, schedule and metrics.

Result files (history, confusion matrices, test metrics, predictions) are written by the callbacks in
`fmnist_pl.callbacks`; this module only computes.
"""

# No `from __future__ import annotations`: jsonargparse reads the constraints inside `Annotated` only from real
# annotations, not from strings.
import math
from typing import Annotated, Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from annotated_types import Ge, Gt, Lt
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from pydantic import validate_call
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from fmnist_pl.errors import ConfigError, TrainingDiverged
from fmnist_pl.networks import NETWORKS

NetworkName = Literal[tuple(NETWORKS)]  # type: ignore[valid-type]  # the registry's names: `fit --help` lists them


# Constraints on the module's options, in their types: the CLI (jsonargparse) checks them as it parses, and
# `validate_call` checks them for Python callers and checkpoints; either refusal is one line (errors.one_line).
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Ge(0), Lt(1)]  # [0, 1)
OpenFraction = Annotated[float, Gt(0), Lt(1)]  # (0, 1)


def stage_metrics() -> MetricCollection:
    """A validation or test stage's metrics: the mean cross-entropy, the accuracy and the confusion matrix. Inputs
    are ours and well-formed, so torchmetrics' per-update argument checks are skipped."""
    return MetricCollection(
        {
            "loss": MeanMetric(),
            "acc": MulticlassAccuracy(10, average="micro", validate_args=False),
            "confusion": MulticlassConfusionMatrix(10, validate_args=False),
        },
        compute_groups=False,  # each metric is updated on its own (the loss takes other inputs)
    )


class FashionMNISTClassifier(L.LightningModule):
    """Trains, validates, tests and predicts with any registered network."""

    @validate_call
    def __init__(
        self,
        network: NetworkName = "cnn",
        network_options: dict[str, Any] | None = None,
        optimizer: Literal["adam", "adamw", "sgd"] = "adam",
        learning_rate: PositiveFloat = 1e-3,
        weight_decay: NonNegativeFloat = 0.0,
        l2_penalty: NonNegativeFloat = 1e-3,
        adam_epsilon: PositiveFloat = 1e-7,
        lr_schedule: Literal["constant", "one_cycle"] = "constant",
        warmup_fraction: OpenFraction = 0.3,
        label_smoothing: Fraction = 0.0,
        test_time_flip: bool = False,
        ema_decay: Fraction = 0.0,
        bias_lr_scale: PositiveFloat = 1.0,
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
        self.save_hyperparameters()
        try:
            self.network = NETWORKS[network](**(network_options or {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.network_options {network_options} do not fit network {network!r}: {e}") from e
        self.example_input_array = torch.zeros(1, 1, 28, 28)  # lets Lightning's summary show shapes and FLOPs
        # One collection per evaluation stage; a ModuleDict, so they move with the model and sync across ranks.
        # Under flip TTA the test stage also keeps the plain (unflipped) accuracy.
        test_metrics = stage_metrics()
        test_metrics.add_metrics({"acc_without_flip": MulticlassAccuracy(10, average="micro", validate_args=False)})
        self.metrics = torch.nn.ModuleDict({"val": stage_metrics(), "test": test_metrics})
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
        metrics = self.metrics[split]
        probabilities = None
        if split == "test":
            logits, probabilities = self.class_probabilities(images)
            confidence, preds = probabilities.max(dim=1)
            if self.hparams.test_time_flip:
                metrics["acc_without_flip"].update(logits.argmax(dim=1), labels)
                self.log("test/acc_without_flip", metrics["acc_without_flip"], on_step=False, on_epoch=True)
        else:  # model selection never uses test-time augmentation
            logits = self(images)
            preds = logits.argmax(dim=1)
        # Weighted by batch size so the epoch value is the exact per-image mean, on any number of devices.
        metrics["loss"].update(F.cross_entropy(logits.float(), labels).detach(), weight=len(labels))
        metrics["acc"].update(preds, labels)
        metrics["confusion"].update(preds, labels)
        self.log(f"{split}/loss", metrics["loss"], on_step=False, on_epoch=True, prog_bar=split != "test")
        self.log(f"{split}/acc", metrics["acc"], on_step=False, on_epoch=True, prog_bar=True)
        if probabilities is None:
            return None
        return {"label": labels, "predicted": preds, "confidence": confidence, "probabilities": probabilities}

    def confusion_matrix(self, split: str) -> torch.Tensor:
        """This epoch's `val` or `test` confusion matrix (rows true, columns predicted), summed over ranks; call on
        every rank (it syncs). Not a logged value: Lightning logs scalars only."""
        return self.metrics[split]["confusion"].compute().cpu()

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
                epochs = round(planned * self.trainer.max_epochs / now)
                raise ConfigError(
                    f"this checkpoint was trained under a one_cycle schedule planned for {epochs} epoch(s); resume "
                    f"it with --trainer.max_epochs {epochs}, or start afresh without --ckpt_path"
                )

    def on_train_epoch_start(self) -> None:
        for total in (self.train_loss_sum, self.train_correct, self.train_images):
            total.zero_()

    def on_train_epoch_end(self) -> None:
        loss, accuracy = self.train_epoch_results()
        self.log_dict({"train/loss": loss, "train/acc": accuracy}, prog_bar=True)  # already reduced over ranks
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])  # the peak-scaled rate under one_cycle

    def on_validation_epoch_start(self) -> None:
        self.metrics["val"]["confusion"].reset()  # the logged metrics Lightning resets itself

    def on_test_epoch_start(self) -> None:
        self.metrics["test"]["confusion"].reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn != "fit" or self.trainer.sanity_checking:
            return
        # Here, before the checkpoint callbacks save this epoch: a diverged epoch never becomes best.ckpt.
        train_loss, _ = self.train_epoch_results()  # the same on every rank, so every rank stops together
        val = self.metrics["val"]
        check_not_diverged(
            self.current_epoch, train_loss, val["loss"].compute().item(), val["acc"].compute().item(), self.hparams
        )

    def on_test_epoch_end(self) -> None:
        # Each image counted once across ranks: the confusion matrix is already the sum over ranks.
        self.log("test/images", self.confusion_matrix("test").sum().float(), reduce_fx="max")

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
        total_steps = self.trainer.estimated_stepping_batches  # finite: the CLI refuses an endless one_cycle fit
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[group["lr"] for group in groups], total_steps=total_steps, pct_start=hp.warmup_fraction
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def check_not_diverged(epoch: int, train_loss: float, val_loss: float, val_accuracy: float, hparams: dict) -> None:
    """Stop training whose loss is not finite, or exploded: a training loss over 10 times that of a uniform guess
    (ln 10) while validation accuracy is at chance. Below that, a high but falling loss may recover."""
    exploded = train_loss > 10 * math.log(10) and val_accuracy < 0.2
    if math.isfinite(train_loss) and math.isfinite(val_loss) and not exploded:
        return
    raise TrainingDiverged(
        f"training diverged in epoch {epoch + 1}: training loss {train_loss:.4g}, validation loss {val_loss:.4g}, "
        f"accuracy {val_accuracy:.1%}; lower --model.learning_rate (now {hparams['learning_rate']:g}) or check the data"
    )
