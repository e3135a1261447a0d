"""Training throughput of `fit` against a minimal hand-written PyTorch loop, same network, data and update.

    python benchmarks/throughput.py [--networks dense cnn linear] [--batch-size 32] [--steps 300] [--rounds 3] [--bare]

Both run in this one process, in alternating rounds (Lightning, plain, Lightning, ...), so machine drift hits
both alike. Throughput counts training images per second over `--steps` steps after a warm-up, excluding start-up.
Needs the real data (or FMNIST_DATA_DIR); prints a table, the ratio Lightning / plain (1.0 = no overhead) and
the overhead in milliseconds per step. `linear` is not a product network: one linear layer whose step is almost
all loop, so its overhead is Lightning's fixed cost per step, which no network's step can come in under.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F

from fmnist_pl.cli import default_progress_bar
from fmnist_pl.data import FashionMNISTDataModule
from fmnist_pl.module import FashionMNISTClassifier
from fmnist_pl.networks import NETWORKS

STUDY_SETTINGS = {
    "dense": {"learning_rate": 1e-4, "l2_penalty": 1e-6},
    "cnn": {"learning_rate": 1e-3, "l2_penalty": 1e-3},
}


class LinearProbe(torch.nn.Module):
    """One 784→10 linear layer: a step with next to no compute, to expose the training loop's own cost."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(28 * 28, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.flatten(1))

    def penalized_weights(self) -> list[torch.Tensor]:
        return [self.linear.weight]


def make_model(network: str) -> FashionMNISTClassifier:
    """The project's module with the study's settings; `linear` swaps in the probe network."""
    if network in NETWORKS:
        return FashionMNISTClassifier(network=network, **STUDY_SETTINGS[network])
    model = FashionMNISTClassifier(network="dense", **STUDY_SETTINGS["dense"])
    model.network = LinearProbe()
    return model


class StepTimer(L.Callback):
    """Wall time of training steps `warmup` to `warmup + steps`, the same window the plain loop measures."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.seconds = warmup, steps, 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            self.seconds = time.perf_counter() - self.started


class TextbookModule(L.LightningModule):
    """The smallest LightningModule doing the plain loop's update: no metrics, no hooks or speed-ups of its own.

    With `--bare` it stands in for the project's module, which separates Lightning's own cost from the project's.
    """

    def __init__(self, classifier: FashionMNISTClassifier) -> None:
        super().__init__()
        self.classifier = classifier

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.classifier(images), labels) + self.classifier.l2_term()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.classifier.configure_optimizers()


def lightning_fit(
    network: str, data: FashionMNISTDataModule, batch_size: int, warmup: int, steps: int, bare: bool = False
) -> float:
    """Images/s of `Trainer.fit` with the project's module and the CLI's progress bar (or, `bare`, neither)."""
    model = TextbookModule(make_model(network)) if bare else make_model(network)
    timer = StepTimer(warmup, steps)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=warmup + steps,
        limit_val_batches=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[timer] if bare else [timer, default_progress_bar()],
        enable_progress_bar=not bare,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return steps * batch_size / timer.seconds


def plain_loop(network: str, data: FashionMNISTDataModule, batch_size: int, warmup: int, steps: int) -> float:
    """Images/s of the minimal loop: forward, cross-entropy + the same L2 term, backward, the same fused Adam."""
    model = make_model(network)
    optimizer = model.configure_optimizers()
    model.train()
    batches = iter(data.train_dataloader())
    for step in range(warmup + steps):
        if step == warmup:
            started = time.perf_counter()
        images, labels = next(batches)
        loss = F.cross_entropy(model(images), labels) + model.l2_term()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - started)


def data_only(data: FashionMNISTDataModule) -> tuple[float, float]:
    """One full training epoch of batches with no model: (seconds, images/s). Loading's share of an epoch."""
    started = time.perf_counter()
    images = sum(len(labels) for _, labels in data.train_dataloader())
    seconds = time.perf_counter() - started
    return seconds, images / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--networks", nargs="+", choices=[*NETWORKS, "linear"], default=[*NETWORKS, "linear"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bare", action="store_true", help="fit a textbook LightningModule with no progress bar")
    args = parser.parse_args()
    data = FashionMNISTDataModule(batch_size=args.batch_size)
    data.prepare_data()
    data.setup("fit")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
        f"{args.steps} timed steps per round, {args.rounds} rounds"
        + (", textbook LightningModule without progress bar (--bare)" if args.bare else "")
    )
    load_seconds, load_rate = data_only(data)
    print(f"data only: one training epoch of batches in {load_seconds:.2f} s ({load_rate:,.0f} images/s)")
    print(
        f"{'network':8} {'Lightning img/s':>16} {'plain img/s':>12} {'ratio':>7} {'overhead ms/step':>17}"
        "   (medians of rounds; per-round ratios)"
    )
    for network in args.networks:
        fit_rates, plain_rates = [], []
        for _ in range(args.rounds):
            fit_rates.append(lightning_fit(network, data, args.batch_size, args.warmup, args.steps, args.bare))
            plain_rates.append(plain_loop(network, data, args.batch_size, args.warmup, args.steps))
        ratios = [f / p for f, p in zip(fit_rates, plain_rates, strict=True)]
        overheads = [1e3 * args.batch_size * (1 / f - 1 / p) for f, p in zip(fit_rates, plain_rates, strict=True)]
        print(
            f"{network:8} {statistics.median(fit_rates):16.0f} {statistics.median(plain_rates):12.0f} "
            f"{statistics.median(ratios):7.3f} {statistics.median(overheads):17.2f}"
            f"   ({', '.join(f'{r:.3f}' for r in ratios)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
