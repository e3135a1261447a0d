"""Training throughput of `fit` against a minimal hand-written PyTorch loop, same network, data and update.

    python benchmarks/throughput.py [--networks dense cnn] [--batch-size 32] [--steps 300] [--rounds 3]

Both run in this one process, in alternating rounds (Lightning, plain, Lightning, ...), so machine drift hits
both alike. Throughput counts training images per second over `--steps` steps after a warm-up, excluding start-up.
Needs the real data (or FMNIST_DATA_DIR); prints a table and the ratio Lightning / plain (1.0 = no overhead).
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

STUDY_SETTINGS = {
    "dense": {"learning_rate": 1e-4, "l2_penalty": 1e-6},
    "cnn": {"learning_rate": 1e-3, "l2_penalty": 1e-3},
}


class StepTimer(L.Callback):
    """Wall time of training steps `warmup` to `warmup + steps`, the same window the plain loop measures."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.seconds = warmup, steps, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.warmup + self.steps - 1:
            self.seconds = time.perf_counter() - self.started


def lightning_fit(network: str, data: FashionMNISTDataModule, batch_size: int, warmup: int, steps: int) -> float:
    """Images/s of `Trainer.fit` with the project's module, with the CLI's progress bar."""
    model = FashionMNISTClassifier(network=network, **STUDY_SETTINGS[network])
    timer = StepTimer(warmup, steps)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=warmup + steps, limit_val_batches=0, accelerator="cpu",
                        devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[timer, default_progress_bar()], num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(model, datamodule=data)
    return steps * batch_size / timer.seconds


def plain_loop(network: str, data: FashionMNISTDataModule, batch_size: int, warmup: int, steps: int) -> float:
    """Images/s of the minimal loop: forward, cross-entropy + the same L2 term, backward, the same fused Adam."""
    model = FashionMNISTClassifier(network=network, **STUDY_SETTINGS[network])
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
    parser.add_argument("--networks", nargs="+", default=["dense", "cnn"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    data = FashionMNISTDataModule(batch_size=args.batch_size)
    data.prepare_data()
    data.setup("fit")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, "
          f"{args.steps} timed steps per round, {args.rounds} rounds")  # fmt: skip
    load_seconds, load_rate = data_only(data)
    print(f"data only: one training epoch of batches in {load_seconds:.2f} s ({load_rate:,.0f} images/s)")
    print(
        f"{'network':8} {'Lightning img/s':>16} {'plain img/s':>12} {'ratio':>7}   (median of rounds; per-round ratios)"
    )
    for network in args.networks:
        fit_rates, plain_rates = [], []
        for _ in range(args.rounds):
            fit_rates.append(lightning_fit(network, data, args.batch_size, args.warmup, args.steps))
            plain_rates.append(plain_loop(network, data, args.batch_size, args.warmup, args.steps))
        ratios = [f / p for f, p in zip(fit_rates, plain_rates, strict=True)]
        print(
            f"{network:8} {statistics.median(fit_rates):16.0f} {statistics.median(plain_rates):12.0f} "
            f"{statistics.median(ratios):7.3f}   ({', '.join(f'{r:.3f}' for r in ratios)})",
            flush=True,
        )


if __name__ == "__main__":
    main()
