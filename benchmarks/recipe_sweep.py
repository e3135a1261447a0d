"""Recipe sweep for the fast profile: validation accuracy per epoch for many training settings (run on a GPU).

    python benchmarks/recipe_sweep.py GRID WORKERS WORKER [DATA_DIR]
    # GRID: `1` (the built-in grid) or a JSONL file of configs; e.g. 12 workers side by side on one GPU:
    for w in $(seq 0 11); do python benchmarks/recipe_sweep.py 1 12 $w & done; wait; cat /tmp/res-*.jsonl

Same networks, loss (cross-entropy + Keras-style L2), fused Adam (eps 1e-7) and one-cycle schedule as
fmnist_pl, with fmnist_pl's flips/shifts run on the GPU. It reports validation accuracy only: the test set plays no part
in choosing settings. Results of the runs quoted in the README: benchmarks/results/recipe_sweep_*.jsonl
(aug -1: none, 0: flips, 1: flips + 1-pixel shifts).
"""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a plain checkout, no install needed
from fmnist_pl.data import shift_and_flip  # noqa: E402
from fmnist_pl.fashion_mnist import read_idx  # noqa: E402
from fmnist_pl.networks import NETWORKS  # noqa: E402


def train(cfg: dict, data: tuple[torch.Tensor, ...]) -> list[float]:
    """One training run; validation accuracy after each epoch."""
    torch.manual_seed(cfg["seed"])
    train_x, train_y, val_x, val_y = data
    net = NETWORKS[cfg["net"]]().to(train_x.device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg["lr"], eps=1e-7, fused=True)
    batch = cfg["bs"]
    steps = -(-len(train_y) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg["lr"], total_steps=steps * cfg["epochs"])
    generator = torch.Generator(device=train_x.device)
    generator.manual_seed(cfg["seed"])
    curve = []
    for _ in range(cfg["epochs"]):
        net.train()
        order = torch.randperm(len(train_y), generator=generator, device=train_x.device)
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            images = train_x[index]
            if cfg["aug"] >= 0:
                images = shift_and_flip(images, generator, max_shift=cfg["aug"])
            loss = F.cross_entropy(net(images), train_y[index], label_smoothing=cfg["ls"])
            loss = loss + cfg["l2"] * sum(w.pow(2).sum() for w in net.penalized_weights())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        net.eval()
        with torch.no_grad():
            curve.append(round((net(val_x).argmax(1) == val_y).float().mean().item(), 4))
    return curve


def grid(name: str) -> list[dict]:
    if name != "1":
        return [json.loads(line) for line in open(name)]
    configs = []
    for net, batches, rates, l2 in (
        ("dense", (128, 256, 512), (1e-3, 2e-3, 4e-3), 1e-6),
        ("cnn", (64, 128, 256), (2e-3, 4e-3, 8e-3), 1e-3),
    ):
        for bs, epochs, lr, aug, ls in itertools.product(batches, (8, 12, 16), rates, (-1, 0, 1), (0.0, 0.1)):
            configs.append(
                {"net": net, "bs": bs, "epochs": epochs, "lr": lr, "aug": aug, "ls": ls, "l2": l2, "seed": 0}
            )
    return configs


if __name__ == "__main__":
    name, workers, worker = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    folder = sys.argv[4] if len(sys.argv) > 4 else "/usr/share/datasets/fashion-mnist"
    images = torch.from_numpy(read_idx(Path(folder, "train-images-idx3-ubyte.gz"), "images").copy())
    images = images.float().div(255).unsqueeze(1)
    labels = torch.from_numpy(read_idx(Path(folder, "train-labels-idx1-ubyte.gz"), "labels").copy()).long()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The study's split: the first 5,000 training images validate, the other 55,000 train.
    data = tuple(t.to(device) for t in (images[5000:], labels[5000:], images[:5000], labels[:5000]))
    with open(f"/tmp/res-{worker}.jsonl", "w") as out:
        for cfg in grid(name)[worker::workers]:
            started = time.time()
            curve = train(cfg, data)
            out.write(json.dumps({**cfg, "val": curve, "s": round(time.time() - started, 1)}) + "\n")
            out.flush()
