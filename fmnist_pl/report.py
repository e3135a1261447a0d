"""The comparison report: figures, tables and a verdict built from a finished run's files, never retyped numbers.

`fmnist-pl report <run dir>` rebuilds it without retraining; the pipeline's report step calls the same function.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import platform
import re
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import metadata
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # figures without pyplot: no display, no process-wide backend choice

from fmnist_pl.data import CLASS_NAMES, load_dataset
from fmnist_pl.errors import DataError
from fmnist_pl.io import atomic_write, write_text_atomic
from fmnist_pl.layout import RunFolder, step_name

STUDY = json.loads((Path(__file__).parent / "reference_study.json").read_text())
STUDY_CITATION = '"Neural Networks", Hoyt Thomas, 2020-03-12'
STUDY_GOAL = 0.90  # the study's own target test accuracy, which neither of its networks reached
PACKAGES = ("fmnist-pl", "torch", "torchvision", "lightning", "torchmetrics", "prefect", "matplotlib", "pandas")


@dataclass
class Section:
    """One part of the report, rendered both to Markdown and to HTML."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the run folder, caption)


def confusion_from_predictions(predictions: pd.DataFrame) -> np.ndarray:
    """10×10 counts, rows true class, columns predicted."""
    matrix = np.zeros((10, 10), dtype=np.int64)
    np.add.at(matrix, (predictions["label"].to_numpy(), predictions["predicted"].to_numpy()), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> pd.DataFrame:
    """Precision, recall and F1 per class from a confusion matrix."""
    true_positive = np.diag(matrix).astype(float)
    precision = np.divide(true_positive, matrix.sum(axis=0), out=np.zeros(10), where=matrix.sum(axis=0) > 0)
    recall = np.divide(true_positive, matrix.sum(axis=1), out=np.zeros(10), where=matrix.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(10), where=(precision + recall) > 0)
    return pd.DataFrame({"precision": precision, "recall": recall, "f1": f1, "images": matrix.sum(axis=1)},
                        index=pd.Index(CLASS_NAMES, name="class")).round(4)  # fmt: skip


def most_confused(matrix: np.ndarray, top: int = 5) -> pd.DataFrame:
    """The largest off-diagonal cells: which true class is taken for which."""
    off = [(matrix[i, j], CLASS_NAMES[i], CLASS_NAMES[j]) for i in range(10) for j in range(10) if i != j]
    rows = sorted(off, reverse=True)[:top]
    return pd.DataFrame(
        [{"true": t, "predicted as": p, "images": int(n), "share of true class": f"{n / matrix[CLASS_NAMES.index(t)].sum():.1%}"}
         for n, t, p in rows]
    )  # fmt: skip


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
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    _save(figure, path)
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
    _save(figure, path)


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
    _save(figure, path)


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
    _save(figure, path)


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")


def _versions() -> dict[str, str]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _read(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path} is missing: the run folder lacks the {what}; was the run completed?")
    return path


def mcnemar_p_value(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar test: the chance of a split at least this uneven of the images that exactly one of
    two classifiers got right, if both were equally accurate (a fair coin decides each such image)."""
    n, k = only_first + only_second, min(only_first, only_second)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, float(Fraction(2 * tail, 2**n)))


def paired_comparison(first: np.ndarray, second: np.ndarray, seeds: list[int], level: float = 0.05,
                      resamples: int = 2000) -> dict:  # fmt: skip
    """Compare two networks on the same test images: `first`, `second` are (seeds × images) booleans, True where the
    image was classified correctly. McNemar's exact test per seed, and a bootstrap confidence interval (test images
    resampled, pairs kept) of the accuracy difference averaged over seeds. The difference counts as significant only
    when the interval excludes zero and every seed's McNemar test is significant in the same direction."""
    difference = (first.astype(np.int8) - second.astype(np.int8)).mean(axis=0)  # per image, averaged over seeds
    rng = np.random.default_rng(0)  # the same interval every time the report is rebuilt
    n = difference.size
    means = np.concatenate([difference[rng.integers(0, n, size=(100, n))].mean(axis=1)
                            for _ in range(resamples // 100)])  # fmt: skip
    low, high = np.quantile(means, [level / 2, 1 - level / 2])
    per_seed = []
    for seed, a, b in zip(seeds, first, second, strict=True):
        only_first, only_second = int((a & ~b).sum()), int((~a & b).sum())
        per_seed.append({"seed": seed, "only_first_correct": only_first, "only_second_correct": only_second,
                         "p_value": mcnemar_p_value(only_first, only_second)})  # fmt: skip
    signs = {np.sign(s["only_first_correct"] - s["only_second_correct"]) for s in per_seed}
    significant = bool(
        (low > 0 or high < 0) and all(s["p_value"] < level for s in per_seed) and len(signs) == 1 and 0 not in signs
    )
    return {"difference": float(difference.mean()), "ci_low": float(low), "ci_high": float(high),
            "confidence": 1 - level, "mcnemar": per_seed, "significant": significant}  # fmt: skip


def describe_spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value), min and max."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "min": float(min(values)), "max": float(max(values))}  # fmt: skip


def _percent_spread(spread: dict) -> str:
    std = f" ± {spread['std'] * 100:.2f}" if spread["std"] is not None else ""
    return f"{spread['mean']:.2%}{std} ({spread['min']:.2%}–{spread['max']:.2%})"


def plot_validation_accuracy(histories: dict[str, dict[int, pd.DataFrame]], path: Path) -> None:
    """Validation accuracy per epoch of every network and seed on one chart, with the study's best validation
    accuracy per network and its 90 % goal as reference lines."""
    figure = Figure(figsize=(10, 5.5))
    ax = figure.subplots()
    colours = matplotlib.colormaps["tab10"]
    for i, (network, by_seed) in enumerate(histories.items()):
        colour = colours(i)
        for k, history in enumerate(by_seed.values()):
            ax.plot(history["epoch"] + 1, history["val/acc"], "o-", ms=3, lw=1.5, color=colour, alpha=0.85,
                    label=f"{network} ({len(by_seed)} seed{'s' * (len(by_seed) > 1)})" if k == 0 else None)  # fmt: skip
        if network in STUDY["networks"]:
            study = STUDY["networks"][network]["best_val_accuracy"]
            ax.axhline(study, color=colour, ls="--", lw=1, label=f"study's {network}: best validation {study:.2%}")
    ax.axhline(STUDY_GOAL, color="black", ls=":", lw=1.5, label=f"study's goal: {STUDY_GOAL:.0%} (test)")
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Validation accuracy per epoch, every network and seed")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(figure, path)


def plot_accuracy_against_cost(results: dict, path: Path) -> None:
    """Test accuracy against training time and against trainable parameters: each seed a dot, each network's mean
    a large marker, and the study's published networks beside them."""
    figure = Figure(figsize=(12, 4.8))
    axes = figure.subplots(1, 2, sharey=True)
    colours = matplotlib.colormaps["tab10"]
    for ax, (key, label) in zip(axes, (("time", "training time (s, log scale)"),
                                       ("parameters", "trainable parameters (log scale)")), strict=True):  # fmt: skip
        for i, (network, r) in enumerate(results.items()):
            seeds = list(r["seeds"].values())
            xs = ([s["training_wall_seconds"] for s in seeds] if key == "time"
                  else [r["trainable_parameters"]] * len(seeds))  # fmt: skip
            ax.scatter(xs, [s["test_accuracy"] for s in seeds], s=14, color=colours(i), alpha=0.6)
            ax.scatter(np.mean(xs), r["test_accuracy"]["mean"], s=90, color=colours(i), edgecolor="black",
                       label=f"{network}, this run")  # fmt: skip
            study = STUDY["networks"].get(network)
            if study:  # same architecture as the port, so the same parameter count
                low, high = (float(v) * study["epochs"] for v in study["seconds_per_epoch"].split("-"))
                x = (low + high) / 2 if key == "time" else r["trainable_parameters"]
                ax.errorbar(x, study["test_accuracy"], xerr=[[x - low], [high - x]] if key == "time" else None,
                            fmt="s", ms=8, mfc="white", color=colours(i), capsize=3,
                            label=f"{network}, study (2020)")  # fmt: skip
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
    figure.text(0.01, 0.01, "Study times: its reported seconds per epoch × epochs, on the author's laptop (range).",
                fontsize=7, color="grey")  # fmt: skip
    _save(figure, path)


def build_report(run_dir: Path) -> dict:
    """Write report.md, report.html, summary.json, figures/ and tables/ into `run_dir`; return the summary."""
    run = RunFolder(Path(run_dir).resolve())  # `outputs/latest` names the run it points at
    try:
        record = json.loads(_read(run.record, "run record (run.json)").read_text())
        steps, settings = record["steps"], record["settings"]
        networks, seeds = record["networks"], record.get("seeds", [0])
    except (ValueError, KeyError, TypeError) as e:  # not JSON, cut off, or not a run record
        raise DataError(f"{run.record} is damaged or not a pipeline run record ({type(e).__name__}: {e}); "
                        "run the pipeline again to write a new run") from e  # fmt: skip
    missing = [step_name(kind, network, seed) for network in networks for seed in seeds
               for kind in ("train", "evaluate") if step_name(kind, network, seed) not in steps]  # fmt: skip
    if "download" not in steps or missing:
        failed = f", failed at {record['failed_step']}" if record.get("failed_step") else ""
        raise DataError(
            f"run {run.path.name} is incomplete (status {record.get('status', 'unknown')}{failed}): no result for "
            f"{(missing or ['download'])[0]}{f' and {len(missing) - 1} more steps' if len(missing) > 1 else ''}; "
            "run the pipeline again with the same options (its finished steps are reused)"
        )
    data = steps["download"]
    tensors = load_dataset(data["source_dir"], require_official=settings.get("require_official", True))
    sections, results, histories, correct = [], {}, {}, {}
    run.tables.mkdir(parents=True, exist_ok=True)
    for network in networks:
        per_seed, histories[network], correct[network] = {}, {}, []
        for seed in seeds:
            training, evaluation = run.training(network, seed), run.evaluation(network, seed)
            what = f"{network} seed {seed}"
            history = pd.read_csv(_read(training.history, f"{what} training history"))
            test = json.loads(_read(evaluation.test_metrics, f"{what} test metrics").read_text())
            predictions = pd.read_csv(_read(evaluation.predictions("test"), f"{what} test predictions"),
                                      index_col="index")  # fmt: skip
            histories[network][seed] = history
            correct[network].append((predictions["label"] == predictions["predicted"]).to_numpy())
            best_row = history.loc[history["val/acc"].idxmax()]
            per_seed[str(seed)] = {  # str: the same keys in memory as in summary.json
                "test_accuracy": test["accuracy"],
                "test_accuracy_without_flip": test.get("accuracy_without_flip", test["accuracy"]),
                "test_loss": test["loss"],
                "best_val_accuracy": float(best_row["val/acc"]),
                "best_val_epoch": int(best_row["epoch"]) + 1,
                "epochs": len(history),
                "training_wall_seconds": steps[step_name("train", network, seed)]["wall_seconds"],
                "mean_epoch_seconds": float(history["epoch_seconds"].mean()),
            }
            if seed == seeds[0]:
                first = {"test": test, "predictions": predictions, "history": history, "evaluation": evaluation}
        values = list(per_seed.values())
        results[network] = {
            "seeds": per_seed,
            "test_accuracy": describe_spread([v["test_accuracy"] for v in values]),
            "test_accuracy_without_flip": describe_spread([v["test_accuracy_without_flip"] for v in values]),
            "training_wall_seconds": describe_spread([v["training_wall_seconds"] for v in values]),
            "best_val_accuracy": describe_spread([v["best_val_accuracy"] for v in values]),
            "test_time_flip": first["test"].get("test_time_flip", False),
            "test_images": first["test"]["images"],
            "trainable_parameters": first["test"]["trainable_parameters"],
            "flops_per_image": first["test"]["flops_per_image"],
            "test_images_per_second": first["test"]["test_images_per_second"],
            "test_precision": first["test"].get("precision", "32-true"),
        }
        sections.append(_network_section(run, network, seeds[0], results[network], first, tensors))
    plot_samples(tensors.train_images[:5000], tensors.train_labels[:5000], run.figures / "samples.png")
    plot_validation_accuracy(histories, run.figures / "validation_accuracy.png")
    plot_accuracy_against_cost(results, run.figures / "accuracy_against_cost.png")

    comparisons = [{"first": a, "second": b, **paired_comparison(np.stack(correct[a]), np.stack(correct[b]), seeds)}
                   for i, a in enumerate(networks) for b in networks[i + 1:]]  # fmt: skip
    spread = "mean ± standard deviation (min–max)" if len(seeds) > 1 else "one seed"
    comparison = pd.DataFrame(
        [{"network": n, "source": "this run", "seeds": ", ".join(map(str, seeds)),
          f"test accuracy, {spread}": _percent_spread(r["test_accuracy"]),
          "without flip TTA": f"{r['test_accuracy_without_flip']['mean']:.2%}" if r["test_time_flip"] else "(no TTA)",
          "best val acc": f"{r['best_val_accuracy']['mean']:.2%}",
          "train time": f"{r['training_wall_seconds']['mean']:.0f} s", "params": f"{r['trainable_parameters']:,}",
          "MFLOPs/image": f"{r['flops_per_image'] / 1e6:.2f}"} for n, r in results.items()]
        + [{"network": n, "source": "2020 study (published)", "seeds": "",
            f"test accuracy, {spread}": f"{s['test_accuracy']:.2%}", "without flip TTA": "(no TTA)",
            "best val acc": f"{s['best_val_accuracy']:.2%}",
            "train time": f"{s['seconds_per_epoch']} s/epoch × {s['epochs']}", "params": "", "MFLOPs/image": ""}
           for n, s in STUDY["networks"].items() if n in results]
    )  # fmt: skip
    tests = pd.DataFrame(
        [{"comparison": f"{c['first']} − {c['second']}", "accuracy difference": f"{c['difference'] * 100:+.2f} points",
          f"{c['confidence']:.0%} bootstrap interval": f"[{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]",
          "McNemar per seed (only first right / only second right, p)": "; ".join(
              f"seed {m['seed']}: {m['only_first_correct']}/{m['only_second_correct']}, p={_p(m['p_value'])}"
              for m in c["mcnemar"]),
          "significant": "yes" if c["significant"] else "no"} for c in comparisons]
    )  # fmt: skip
    verdict = _verdict(results, comparisons, len(seeds))
    study_tables = [pd.DataFrame(STUDY["networks"][n]["confusion_matrix_test"], CLASS_NAMES, CLASS_NAMES).rename_axis(f"study {n}: true \\ predicted")
                    for n in results if n in STUDY["networks"]]  # fmt: skip
    provenance = {
        "run": record.get("run_dir"), "started": record.get("started"), "settings": settings,
        "configs": record.get("configs", {}),
        "data source": data["source_dir"], "data sha256": data["sha256"], "packages": _versions(),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch threads, CUDA {'available' if torch.cuda.is_available() else 'not available'}",
        "step wall seconds": {s: v.get("wall_seconds") for s, v in steps.items() if isinstance(v, dict)},
        "cached steps": [s for s, v in steps.items() if isinstance(v, dict) and v.get("cached")],
    }  # fmt: skip
    head = [
        Section(
            "Comparison",
            [verdict, f"Reference rows are the published figures of the 2020 study ({STUDY_CITATION}). Each network "
             f"was trained and tested once per seed ({', '.join(map(str, seeds))}); networks are compared on the "
             "same test images, pair by pair."],
            [comparison, tests],
            [("figures/validation_accuracy.png", "Validation accuracy per epoch: every network and seed, the study's "
              "best validation accuracies (dashed) and its 90 % goal (dotted)"),
             ("figures/accuracy_against_cost.png", "Test accuracy against training time and parameters, "
              "this run beside the study")],
        ),
        *sections,
        Section("The study's test confusion matrices (published)", [], study_tables),
        Section("Training images", [], [], [("figures/samples.png", "Sample training images per class")]),
        Section("Provenance", [f"```\n{json.dumps(provenance, indent=2)}\n```"]),
    ]  # fmt: skip
    title = f"fmnist-pl report: {run.path.name}"
    write_text_atomic(run.report(".md"), _markdown(title, head))
    write_text_atomic(run.report(".html"), _html(title, _headline(results), head, run.path))
    summary = {
        "networks": results,
        "seeds": seeds,
        "comparisons": comparisons,
        "verdict": verdict,
        "provenance": provenance,
        "study": {
            n: {k: v for k, v in s.items() if k != "confusion_matrix_test"} for n, s in STUDY["networks"].items()
        },
    }
    write_text_atomic(run.summary, json.dumps(summary, indent=2) + "\n")
    summary["table"] = comparison.to_dict(orient="records")
    return summary


def _p(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.2f}"


def _network_section(run: RunFolder, network: str, seed: int, r: dict, first: dict, tensors) -> Section:  # noqa: ANN001
    """A network's details, from its first seed: curves, per-class scores, confusion matrices, mistakes."""
    evaluation, history = first["evaluation"], first["history"]
    test_matrix = pd.read_csv(_read(evaluation.confusion_test, "test confusion matrix"), index_col=0).to_numpy()
    train_predictions = pd.read_csv(_read(evaluation.predictions("train"), "train predictions"), index_col="index")
    train_matrix = confusion_from_predictions(train_predictions)
    scores = per_class_scores(test_matrix)
    for name, table in ((f"{network}_confusion_matrix_test.csv", pd.DataFrame(test_matrix, CLASS_NAMES, CLASS_NAMES)),
                        (f"{network}_confusion_matrix_train.csv", pd.DataFrame(train_matrix, CLASS_NAMES, CLASS_NAMES)),
                        (f"{network}_per_class_test.csv", scores)):  # fmt: skip
        with atomic_write(run.tables / name) as tmp:
            table.to_csv(tmp)
    best_epoch = plot_curves(history, network, run.figures / f"{network}_curves.png")
    plot_confusion(test_matrix, f"{network}: test confusion matrix", run.figures / f"{network}_confusion_test.png")
    plot_confusion(train_matrix, f"{network}: training-set confusion matrix",
                   run.figures / f"{network}_confusion_train.png")  # fmt: skip
    plot_gallery(tensors.test_images, first["predictions"], f"{network}: most confident mistakes on the test set",
                 run.figures / f"{network}_mistakes.png")  # fmt: skip
    s = r["seeds"][str(seed)]
    tta = (f" with flip test-time augmentation ({s['test_accuracy_without_flip']:.2%} without)"
           if r["test_time_flip"] else "")  # fmt: skip
    return Section(
        network,
        [f"Over {len(r['seeds'])} seed(s), test accuracy {_percent_spread(r['test_accuracy'])}. The details below are "
         f"seed {seed}'s: test accuracy **{s['test_accuracy']:.2%}**{tta} on {r['test_images']:,} images "
         f"(best-validation checkpoint, epoch {best_epoch} of {s['epochs']}; validation accuracy "
         f"{s['best_val_accuracy']:.2%}). Training-set accuracy of that checkpoint: "
         f"{np.trace(train_matrix) / train_matrix.sum():.2%}.",
         f"{r['trainable_parameters']:,} trainable parameters, {r['flops_per_image'] / 1e6:.2f} MFLOPs per image "
         f"(forward), trained in {s['training_wall_seconds']:.0f} s ({s['mean_epoch_seconds']:.1f} s per epoch); "
         f"the test set ran at {r['test_images_per_second']:,} images/s.",
         "Per-class scores on the test set, then the most confused pairs:"],
        [scores, most_confused(test_matrix)],
        [(f"figures/{network}_curves.png", f"Training curves (seed {seed})"),
         (f"figures/{network}_confusion_test.png", f"Test confusion matrix (seed {seed}; counts and % of the true class)"),
         (f"figures/{network}_confusion_train.png", f"Training-set confusion matrix (seed {seed})"),
         (f"figures/{network}_mistakes.png", f"Most confident mistakes (seed {seed}; true, predicted, confidence)")],
    )  # fmt: skip


def _verdict(results: dict, comparisons: list[dict], seeds: int) -> str:
    """Which network is most accurate, but only where a paired test says the difference is real; which is cheapest
    to train; whether the study's 90 % goal was reached."""
    mean = {n: r["test_accuracy"]["mean"] for n, r in results.items()}
    goal = [n for n in results if mean[n] >= STUDY_GOAL]
    goal_text = (f"The study's goal of {STUDY_GOAL:.0%} test accuracy is reached by **{', '.join(goal)}**."
                 if goal else f"No network reaches the study's goal of {STUDY_GOAL:.0%} test accuracy.")  # fmt: skip
    if len(results) < 2:
        ((network, _),) = results.items()
        return f"Only {network} was trained: {mean[network]:.2%} mean test accuracy. {goal_text}"
    sentences = []
    for c in sorted(comparisons, key=lambda c: -abs(c["difference"])):
        better, worse = (c["first"], c["second"]) if c["difference"] >= 0 else (c["second"], c["first"])
        low, high = (c["ci_low"], c["ci_high"]) if better == c["first"] else (-c["ci_high"], -c["ci_low"])
        interval = (f"difference {abs(c['difference']) * 100:.2f} points, {c['confidence']:.0%} interval "
                    f"[{low * 100:+.2f}, {high * 100:+.2f}]")  # fmt: skip
        if c["significant"]:
            sentences.append(f"**{better}** beats {worse}: {mean[better]:.2%} against {mean[worse]:.2%} ({interval}; "
                             f"McNemar p < 0.05 on each of {seeds} seed(s)).")  # fmt: skip
        else:
            sentences.append(f"{better} and {worse}: no detectable difference ({mean[better]:.2%} against "
                             f"{mean[worse]:.2%}; {interval}).")  # fmt: skip
    winners = {c["first"] if c["difference"] > 0 else c["second"] for c in comparisons if c["significant"]}
    losers = {c["second"] if c["difference"] > 0 else c["first"] for c in comparisons if c["significant"]}
    best = [n for n in winners if n not in losers and all(
        c["significant"] for c in comparisons if n in (c["first"], c["second"]))]  # fmt: skip
    lead = (f"**{best[0]}** is the most accurate network, significantly ahead of every other."
            if best else "No network is significantly more accurate than every other.")  # fmt: skip
    cheapest = min(results, key=lambda k: results[k]["training_wall_seconds"]["mean"])
    r = results[cheapest]
    cost = (f"**{cheapest}** took the least time to train: {r['training_wall_seconds']['mean']:.0f} s, with "
            f"{r['flops_per_image'] / 1e6:.2f} MFLOPs per image and {r['trainable_parameters']:,} parameters "
            "(trainings run side by side share the machine).")  # fmt: skip
    return " ".join([lead, *sentences, cost, goal_text])


def _markdown(title: str, sections: list[Section]) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        lines += [p + "\n" for p in section.paragraphs]
        lines += [_md_table(table) + "\n" for table in section.tables]
        lines += [f"![{caption}]({path})\n" for path, caption in section.figures]
    return "\n".join(lines)


def _md_table(table: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs the optional `tabulate` package)."""
    frame = table.reset_index() if table.index.name or not isinstance(table.index, pd.RangeIndex) else table
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;padding:0 1.2em;
  color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #e4e8ef;padding-bottom:.2em;margin-top:1.8em}
.cards{display:flex;flex-wrap:wrap;gap:1em;margin:1.2em 0}
.card{flex:1 1 220px;border:1px solid #d8dee8;border-radius:8px;padding:.8em 1em;background:#f8fafc}
.card .name{font-weight:600;color:#4a5568}.card .value{font-size:2em;font-weight:700}
.card .line{font-size:.9em;color:#4a5568}.goal-yes{color:#1a7f37;font-weight:600}.goal-no{color:#b42318;font-weight:600}
table{border-collapse:collapse;margin:1em 0;font-size:.88em}
th{background:#eef2f7;text-align:left}td,th{border:1px solid #d8dee8;padding:4px 9px}td{text-align:right}
td:first-child{text-align:left}tr:nth-child(even) td{background:#fafbfd}
.figures{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:1em}
figure{margin:0}figure img{width:100%;border:1px solid #e4e8ef}figcaption{font-size:.85em;color:#4a5568}
pre{background:#f4f6f9;padding:1em;overflow-x:auto;font-size:.8em}
@media print{body{max-width:none;margin:0;font-size:10pt}.figures{display:block}
  figure,table,.card{break-inside:avoid}h2{break-after:avoid}pre{white-space:pre-wrap}}
"""


def _headline(results: dict) -> str:
    """The report's first block: each network's test accuracy against the study and the 90 % goal."""
    cards = []
    for network, r in results.items():
        accuracy = r["test_accuracy"]
        study = STUDY["networks"].get(network)
        against = (f"study: {study['test_accuracy']:.2%} ({(accuracy['mean'] - study['test_accuracy']) * 100:+.2f} points)"
                   if study else "not in the study")  # fmt: skip
        spread = (f"± {accuracy['std'] * 100:.2f} over {len(r['seeds'])} seeds" if accuracy["std"] is not None
                  else "one seed")  # fmt: skip
        reached = accuracy["mean"] >= STUDY_GOAL
        cards.append(
            f"<div class='card'><div class='name'>{html.escape(network)}</div>"
            f"<div class='value'>{accuracy['mean']:.2%}</div><div class='line'>test accuracy, {spread}</div>"
            f"<div class='line'>{html.escape(against)}</div><div class='line {'goal-yes' if reached else 'goal-no'}'>"
            f"90 % goal {'reached' if reached else 'not reached'}</div></div>"
        )  # fmt: skip
    return f"<div class='cards'>{''.join(cards)}</div>"


def _html(title: str, headline: str, sections: list[Section], run_dir: Path) -> str:
    """One self-contained page: styles inline, images embedded as data URIs, readable on screen and on paper."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{headline}"]  # fmt: skip
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for paragraph in section.paragraphs:
            if paragraph.startswith("```"):
                parts.append(f"<pre>{html.escape(paragraph.strip('`').strip())}</pre>")
            else:
                text = html.escape(paragraph)
                while "**" in text:
                    text = text.replace("**", "<b>", 1).replace("**", "</b>", 1)
                parts.append(f"<p>{text}</p>")
        # The row index only where it means something (class names), never pandas' 0, 1, 2, ...
        parts += [table.to_html(border=0, index=not isinstance(table.index, pd.RangeIndex)) for table in section.tables]
        if section.figures:
            parts.append("<div class='figures'>")
            for path, caption in section.figures:
                parts.append(f"<figure><img src='{png_data_uri(run_dir / path)}' alt='{html.escape(caption)}'>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
            parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def png_data_uri(path: Path, max_pixels: int | None = None) -> str:
    """A PNG file as a data URI; with `max_pixels`, downscaled to fit that box and reduced to a 64-colour palette
    (plots need no more, and the result is 3-4 times smaller)."""
    data = path.read_bytes()
    if max_pixels is not None:
        from PIL import Image

        image = Image.open(path)
        image.thumbnail((max_pixels, max_pixels))  # keeps the aspect ratio
        buffer = io.BytesIO()
        # Octree quantization keeps small markers' colours, which the default median cut turns grey.
        image.convert("RGB").quantize(colors=64, method=Image.Quantize.FASTOCTREE).save(buffer, "PNG", optimize=True)
        data = buffer.getvalue()
    return f"data:image/png;base64,{base64.b64encode(data).decode()}"


def markdown_with_embedded_figures(run_dir: Path, max_pixels: int = 800) -> str:
    """report.md with every figure inlined as a downscaled PNG data URI, for places that cannot see the run
    folder (the Prefect UI's markdown artifacts, stored in its database), headed by the run folder's path."""
    run = RunFolder(Path(run_dir).resolve())
    markdown = re.sub(
        r"!\[([^\]]*)\]\((figures/[^)]+)\)",
        lambda m: f"![{m.group(1)}]({png_data_uri(run.path / m.group(2), max_pixels)})",
        run.report(".md").read_text(),
    )
    return markdown.replace("\n", f"\n\nRun folder: `{run.path}`\n", 1)


def report_main(argv: list[str]) -> None:
    """`fmnist-pl report RUN_DIR`: rebuild a finished run's report without retraining."""
    parser = argparse.ArgumentParser(prog="fmnist-pl report", description=report_main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a pipeline run folder, e.g. outputs/latest")
    args = parser.parse_args(argv)
    build_report(args.run_dir)
    print(
        f"report written: {args.run_dir / 'report.md'}, {args.run_dir / 'report.html'}, {args.run_dir / 'summary.json'}"
    )
