"""The report's figures, one function each, drawn with matplotlib's object API (no pyplot: no display, no
process-wide backend) and saved as PNG into the run's figures/ folder."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fmnist_pl.fashion_mnist import CLASS_NAMES
from fmnist_pl.io import atomic_write
from fmnist_pl.report.study import STUDY, STUDY_GOAL

# Every figure a report has: these per network (its first seed's), and these once per run. The sections list them
# in this order, and the tests count them from here.
NETWORK_FIGURES = ("curves", "confusion_test", "confusion_train", "mistakes")
RUN_FIGURES = ("validation_accuracy", "accuracy_against_cost", "samples")


def network_figure(network: str, kind: str) -> str:
    """A network's figure, relative to the run folder: `figures/bn_cnn_curves.png`."""
    return f"figures/{network}_{kind}.png"


def run_figure(kind: str) -> str:
    """A run-wide figure, relative to the run folder: `figures/samples.png`."""
    return f"figures/{kind}.png"


def figure_files(networks: list[str]) -> list[str]:
    """Every figure of a report on `networks`, relative to the run folder."""
    return [network_figure(n, kind) for n in networks for kind in NETWORK_FIGURES] + [
        run_figure(k) for k in RUN_FIGURES
    ]


def epoch_axis(ax: Axes, epochs: int) -> None:
    """Whole epochs on the x axis, 1 to `epochs`: never 0.945 ... 1.050 for a one-epoch run."""
    ax.set_xlim(0.5, epochs + 0.5)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True, min_n_ticks=1))


def plot_curves(history: pd.DataFrame, network: str, path: Path) -> int:
    """Loss and accuracy per epoch, train and validation, best validation epoch marked; returns that epoch (1-based)."""
    epochs = history["epoch"] + 1
    best = int(epochs[history["val/acc"].idxmax()])
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        ax.plot(epochs, history[f"train/{metric}"], "o-", ms=3, label="train")
        ax.plot(epochs, history[f"val/{metric}"], "o-", ms=3, label="validation")
        ax.axvline(best, color="grey", ls="--", lw=1, label=f"best validation (epoch {best})")
        label = "accuracy" if metric == "acc" else "cross-entropy loss"
        ax.set(xlabel="epoch", ylabel=label, title=f"{network}: {label}")
        epoch_axis(ax, len(epochs))
        ax.grid(alpha=0.3)
        ax.legend()
    save(figure, path)
    return best


def plot_confusion(matrix: np.ndarray, title: str, path: Path) -> None:
    """Annotated heatmap: counts and row-normalised percentages, class names on both axes."""
    row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(9, 8))
    ax = figure.subplots()
    ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    for i in range(10):
        for j in range(10):
            colour = "white" if row_share[i, j] > 0.5 else "black"
            ax.text(j, i, f"{matrix[i, j]}\n{row_share[i, j]:.0%}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(range(10), CLASS_NAMES)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    save(figure, path)


def plot_gallery(images: torch.Tensor, predictions: pd.DataFrame, title: str, path: Path, count: int = 24) -> None:
    """The most confident mistakes, each with its true label, predicted label and confidence."""
    wrong = predictions[predictions["label"] != predictions["predicted"]].nlargest(count, "confidence")
    columns = 8
    rows = max(1, -(-len(wrong) // columns))
    figure = Figure(figsize=(columns * 1.6, rows * 2.0))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (index, row) in zip(axes.flat, wrong.iterrows(), strict=False):  # more axes than mistakes is fine
        ax.imshow(images[int(index)], cmap="gray_r")
        ax.set_title(
            f"true {CLASS_NAMES[int(row['label'])]}\npred {CLASS_NAMES[int(row['predicted'])]}\n{row['confidence']:.0%}",
            fontsize=7,
        )
    figure.suptitle(title)
    save(figure, path)


def plot_samples(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 8) -> None:
    """A grid of training images, one row per class."""
    figure = Figure(figsize=(per_class * 0.9, 10 * 0.95))
    axes = figure.subplots(10, per_class)
    for label in range(10):
        indices = (labels == label).nonzero().flatten()[:per_class]
        for k, ax in enumerate(axes[label]):
            ax.axis("off")
            if k < len(indices):
                ax.imshow(images[indices[k]], cmap="gray_r")
        axes[label][0].text(-4, 14, CLASS_NAMES[label], ha="right", va="center", fontsize=8)
    figure.suptitle("Training images, one row per class")
    save(figure, path)


def save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")


def plot_validation_accuracy(histories: dict[str, dict[int, pd.DataFrame]], path: Path) -> None:
    """Validation accuracy per epoch of every network and seed on one chart, with the study's best validation
    accuracy per network and its 90 % goal as reference lines."""
    figure = Figure(figsize=(10, 5.5))
    ax = figure.subplots()
    colours = matplotlib.colormaps["tab10"]
    for i, (network, by_seed) in enumerate(histories.items()):
        colour = colours(i)
        for k, history in enumerate(by_seed.values()):
            ax.plot(
                history["epoch"] + 1,
                history["val/acc"],
                "o-",
                ms=3,
                lw=1.5,
                color=colour,
                alpha=0.85,
                label=f"{network} ({len(by_seed)} seed{'s' * (len(by_seed) > 1)})" if k == 0 else None,
            )
        if network in STUDY["networks"]:
            study = STUDY["networks"][network]["best_val_accuracy"]
            ax.axhline(study, color=colour, ls="--", lw=1, label=f"study's {network}: best validation {study:.2%}")
    ax.axhline(STUDY_GOAL, color="black", ls=":", lw=1.5, label=f"study's goal: {STUDY_GOAL:.0%} (test)")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy per epoch, every network and seed")
    epoch_axis(ax, max(len(history) for by_seed in histories.values() for history in by_seed.values()))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    save(figure, path)


def plot_accuracy_against_cost(results: dict, path: Path) -> None:
    """Test accuracy against training time and against trainable parameters: each seed a dot, each network's mean
    a large marker, and the study's published networks beside them."""
    figure = Figure(figsize=(12, 4.8))
    axes = figure.subplots(1, 2, sharey=True)
    colours = matplotlib.colormaps["tab10"]
    for ax, (key, label) in zip(
        axes,
        (("time", "training time (s, log scale)"), ("parameters", "trainable parameters (log scale)")),
        strict=True,
    ):
        for i, (network, r) in enumerate(results.items()):
            seeds = list(r["seeds"].values())
            xs = (
                [s["training_wall_seconds"] for s in seeds]
                if key == "time"
                else [r["trainable_parameters"]] * len(seeds)
            )
            ax.scatter(xs, [s["test_accuracy"] for s in seeds], s=14, color=colours(i), alpha=0.6)
            ax.scatter(
                np.mean(xs),
                r["test_accuracy"]["mean"],
                s=90,
                color=colours(i),
                edgecolor="black",
                label=f"{network}, this run",
            )
            study = STUDY["networks"].get(network)
            if study:  # same architecture as the port, so the same parameter count
                low, high = (float(v) * study["epochs"] for v in study["seconds_per_epoch"].split("-"))
                x = (low + high) / 2 if key == "time" else r["trainable_parameters"]
                ax.errorbar(
                    x,
                    study["test_accuracy"],
                    xerr=[[x - low], [high - x]] if key == "time" else None,
                    fmt="s",
                    ms=8,
                    mfc="white",
                    color=colours(i),
                    capsize=3,
                    label=f"{network}, study (2020)",
                )
        ax.axhline(STUDY_GOAL, color="black", ls=":", lw=1.5, label=f"goal {STUDY_GOAL:.0%}")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))  # 100, 200, 500, 1,000, ...
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel=label, title=f"Test accuracy against {key}")
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=7, loc="center right")  # between the 90 % line and the top: no points there
    figure.text(
        0.01,
        0.01,
        "Study times: its reported seconds per epoch × epochs, on the author's laptop (range).",
        fontsize=7,
        color="grey",
    )
    save(figure, path)
