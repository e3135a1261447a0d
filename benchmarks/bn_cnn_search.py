"""Architecture and recipe search for BatchNormCNN on the CPU: one plain-PyTorch training run per call.

    python benchmarks/bn_cnn_search.py --widths 24,48,96 --epochs 8 --tag wide   # appends a JSON line per run

A plain loop rather than `fmnist-pl fit`, so that architectures not in the package (residual stages, pooling
before the stage's first convolution, other widths) can be tried without registering them. The recipe is the one
the `fast_bn_cnn` config gives the module: AdamW with decoupled weight decay on kernels only, one-cycle, label
smoothing, flips (and optionally shifts or random erasing) on the batch tensors, bf16 autocast, flip TTA at the end.
Validation accuracy (the first 5,000 training images) chooses; test accuracy is recorded, never used to choose.
Results: benchmarks/results/bn_cnn_search.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fmnist_pl.data import shift_and_flip
from fmnist_pl.fashion_mnist import load_dataset

RESULTS = Path(__file__).parent / "results" / "bn_cnn_search.jsonl"


def conv_bn_act(channels_in: int, channels_out: int, activation: type[nn.Module]) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1, bias=False), nn.BatchNorm2d(channels_out), activation()]


class Stage(nn.Module):
    """`convs` conv-BN-activation layers; max-pooling after (or, with pool_first, before) the first, except in
    the first stage; optionally a residual connection around all but the first."""

    def __init__(self, channels_in: int, width: int, args: argparse.Namespace, pool: bool) -> None:
        super().__init__()
        activation = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}[args.act]
        self.first = nn.Sequential(*conv_bn_act(channels_in, width, activation))
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.rest = nn.Sequential(*[m for _ in range(args.convs - 1) for m in conv_bn_act(width, width, activation)])
        self.residual, self.pool_first = args.residual, args.pool_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(self.pool(x)) if self.pool_first else self.pool(self.first(x))
        y = self.rest(x)
        return x + y if self.residual else y


class Net(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        widths = [int(w) for w in args.widths.split(",")]
        stages, channels_in = [], 1
        for i, width in enumerate(widths):
            stages.append(Stage(channels_in, width, args, pool=i > 0))
            channels_in = width
        self.body, self.head = nn.Sequential(*stages), nn.Linear(channels_in, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body((x - 0.286) / 0.353).amax(dim=(2, 3)))


def random_erase(images: torch.Tensor, generator: torch.Generator, probability: float) -> torch.Tensor:
    """With `probability`, zero one random square of 6–12 pixels per image (the normalized image's mean)."""
    n = images.shape[0]
    size = torch.randint(6, 13, (n,), generator=generator)
    top = (torch.rand(n, generator=generator) * (28 - size)).long()
    left = (torch.rand(n, generator=generator) * (28 - size)).long()
    pixels = torch.arange(28)
    rows = (pixels >= top[:, None]) & (pixels < (top + size)[:, None])
    cols = (pixels >= left[:, None]) & (pixels < (left + size)[:, None])
    chosen = torch.rand(n, generator=generator) < probability
    box = rows[:, :, None] & cols[:, None, :] & chosen[:, None, None]
    return images.masked_fill(box.unsqueeze(1), 0.286)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bf16: bool) -> tuple[float, float]:
    """(plain accuracy, accuracy with flip TTA)."""
    model.eval()
    plain, flipped = [], []
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        for chunk in images.split(1000):
            x = (chunk.unsqueeze(1).float() / 255).contiguous(memory_format=torch.channels_last)
            plain.append(model(x).float().softmax(1))
            flipped.append(model(x.flip(-1)).float().softmax(1))
    plain, flipped = torch.cat(plain), torch.cat(flipped)
    return (plain.argmax(1) == labels).float().mean().item(), (
        (plain + flipped).argmax(1) == labels
    ).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="16,32,64")
    parser.add_argument("--convs", type=int, default=2, help="conv layers per stage")
    parser.add_argument("--residual", type=int, default=0)
    parser.add_argument("--pool-first", type=int, default=0, help="max-pool before a stage's first conv, not after")
    parser.add_argument("--act", default="gelu")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--shift", type=int, default=0, help="random shifts of up to this many pixels (0: none)")
    parser.add_argument("--erase", type=float, default=0.0, help="probability of random erasing")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: none)")
    parser.add_argument("--bf16", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset()
    val_images, val_labels = data.train_images[:5000], data.train_labels[:5000]
    train_images = data.train_images[5000:].unsqueeze(1).float() / 255
    train_labels = data.train_labels[5000:]

    net = Net(args).to(memory_format=torch.channels_last)
    decayed = [p for p in net.parameters() if p.ndim > 1]
    others = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": args.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=args.lr,
        fused=True,
    )
    steps = args.epochs * math.ceil(len(train_labels) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.25)
    ema = None
    if args.ema:
        ema = torch.optim.swa_utils.AveragedModel(
            net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(args.ema), use_buffers=True
        )
    generator = torch.Generator().manual_seed(args.seed)
    started, epoch_seconds = time.perf_counter(), []
    for _ in range(args.epochs):
        net.train()
        epoch_started = time.perf_counter()
        for batch in torch.randperm(len(train_labels), generator=generator).split(args.batch_size):
            images = shift_and_flip(train_images[batch], generator, args.shift)
            if args.erase:
                images = random_erase(images, generator, args.erase)
            with torch.autocast("cpu", torch.bfloat16, enabled=bool(args.bf16)):
                loss = F.cross_entropy(
                    net(images.contiguous(memory_format=torch.channels_last)),
                    train_labels[batch],
                    label_smoothing=args.label_smoothing,
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if ema:
                ema.update_parameters(net)
        epoch_seconds.append(time.perf_counter() - epoch_started)
    train_seconds = time.perf_counter() - started
    model = ema.module if ema else net
    val, val_tta = accuracy(model, val_images, val_labels, bool(args.bf16))
    test, test_tta = accuracy(model, data.test_images, data.test_labels, bool(args.bf16))
    result = {
        **vars(args),
        "params": sum(p.numel() for p in net.parameters()),
        "val": val,
        "val_tta": val_tta,
        "test": test,
        "test_tta": test_tta,
        "train_seconds": round(train_seconds, 1),
        "median_epoch_seconds": round(sorted(epoch_seconds)[len(epoch_seconds) // 2], 1),
    }
    print(json.dumps(result), flush=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
