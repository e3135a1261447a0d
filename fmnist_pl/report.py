"""The comparison report: figures, tables and a verdict built from a finished run's files, never retyped numbers.

`fmnist-pl report <run dir>` rebuilds it without retraining; the pipeline's report step calls the same function.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import platform
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import matplotlib.ticker
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure  # figures without pyplot: no display, no process-wide backend choice

from fmnist_pl.data import CLASS_NAMES, load_dataset
from fmnist_pl.errors import DataError
from fmnist_pl.io import atomic_write, write_text_atomic
from fmnist_pl.layout import RunFolder

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


def build_report(run_dir: Path) -> dict:
    """Write report.md, report.html, summary.json, figures/ and tables/ into `run_dir`; return the summary."""
    run = RunFolder(Path(run_dir).resolve())  # `outputs/latest` names the run it points at
    record = json.loads(_read(run.record, "run record (run.json)").read_text())
    steps, settings = record["steps"], record["settings"]
    data = steps["download"]
    tensors = load_dataset(data["source_dir"], require_official=settings.get("require_official", True))
    networks = record["networks"]
    sections, results = [], {}
    run.tables.mkdir(parents=True, exist_ok=True)
    for network in networks:
        training, evaluation = run.training(network), run.evaluation(network)
        history = pd.read_csv(_read(training.history, f"{network} training history"))
        test = json.loads(_read(evaluation.test_metrics, f"{network} test metrics").read_text())
        test_predictions = pd.read_csv(_read(evaluation.predictions("test"), "test predictions"), index_col="index")
        train_predictions = pd.read_csv(_read(evaluation.predictions("train"), "train predictions"), index_col="index")
        test_matrix = pd.read_csv(_read(evaluation.confusion_test, "test confusion matrix"), index_col=0).to_numpy()
        train_matrix = confusion_from_predictions(train_predictions)
        scores = per_class_scores(test_matrix)
        confused = most_confused(test_matrix)
        for name, table in ((f"{network}_confusion_matrix_test.csv", pd.DataFrame(test_matrix, CLASS_NAMES, CLASS_NAMES)),
                            (f"{network}_confusion_matrix_train.csv", pd.DataFrame(train_matrix, CLASS_NAMES, CLASS_NAMES)),
                            (f"{network}_per_class_test.csv", scores)):  # fmt: skip
            with atomic_write(run.tables / name) as tmp:
                table.to_csv(tmp)
        best_epoch = plot_curves(history, network, run.figures / f"{network}_curves.png")
        plot_confusion(test_matrix, f"{network}: test confusion matrix", run.figures / f"{network}_confusion_test.png")
        plot_confusion(train_matrix, f"{network}: training-set confusion matrix",
                       run.figures / f"{network}_confusion_train.png")  # fmt: skip
        plot_gallery(tensors.test_images, test_predictions, f"{network}: most confident mistakes on the test set",
                     run.figures / f"{network}_mistakes.png")  # fmt: skip
        best_row = history.loc[history["val/acc"].idxmax()]
        results[network] = {
            "test_accuracy": test["accuracy"],
            "test_time_flip": test.get("test_time_flip", False),
            "test_accuracy_without_flip": test.get("accuracy_without_flip", test["accuracy"]),
            "test_loss": test["loss"],
            "test_images": test["images"],
            "train_accuracy_final_epoch": float(history["train/acc"].iloc[-1]),
            "train_set_accuracy_best_checkpoint": float(np.trace(train_matrix) / train_matrix.sum()),
            "best_val_accuracy": float(best_row["val/acc"]),
            "best_val_epoch": best_epoch,
            "epochs": len(history),
            "training_wall_seconds": steps[f"train-{network}"]["wall_seconds"],
            "mean_epoch_seconds": float(history["epoch_seconds"].mean()),
            "trainable_parameters": test["trainable_parameters"],
            "flops_per_image": test["flops_per_image"],
            "test_images_per_second": test["test_images_per_second"],
            "test_precision": test.get("precision", "32-true"),
        }
        r = results[network]
        tta = (f" with flip test-time augmentation ({r['test_accuracy_without_flip']:.2%} without)"
               if r["test_time_flip"] else "")  # fmt: skip
        sections.append(Section(
            f"{network}",
            [f"Test accuracy **{r['test_accuracy']:.2%}**{tta} on {r['test_images']:,} images (best-validation "
             f"checkpoint, epoch {best_epoch} of {r['epochs']}; validation accuracy {r['best_val_accuracy']:.2%}). "
             f"Training-set accuracy of that checkpoint: {r['train_set_accuracy_best_checkpoint']:.2%}.",
             f"{r['trainable_parameters']:,} trainable parameters, {r['flops_per_image'] / 1e6:.2f} MFLOPs per image "
             f"(forward), trained in {r['training_wall_seconds']:.0f} s ({r['mean_epoch_seconds']:.1f} s per epoch); "
             f"the test set ran at {r['test_images_per_second']:,} images/s.",
             "Per-class scores on the test set, then the most confused pairs:"],
            [scores, confused],
            [(f"figures/{network}_curves.png", "Training curves"),
             (f"figures/{network}_confusion_test.png", "Test confusion matrix (counts and % of the true class)"),
             (f"figures/{network}_confusion_train.png", "Training-set confusion matrix"),
             (f"figures/{network}_mistakes.png", "Most confident mistakes (true, predicted, confidence)")],
        ))  # fmt: skip
    plot_samples(tensors.train_images[:5000], tensors.train_labels[:5000], run.figures / "samples.png")

    comparison = pd.DataFrame(
        [{"network": n, "source": "this run", "test accuracy": f"{r['test_accuracy']:.2%}",
          "without flip TTA": f"{r['test_accuracy_without_flip']:.2%}" if r["test_time_flip"] else "(no TTA)",
          "test loss": f"{r['test_loss']:.3f}",
          "best val acc (epoch)": f"{r['best_val_accuracy']:.2%} ({r['best_val_epoch']})", "epochs": r["epochs"],
          "train time": f"{r['training_wall_seconds']:.0f} s", "params": f"{r['trainable_parameters']:,}",
          "MFLOPs/image": f"{r['flops_per_image'] / 1e6:.2f}"} for n, r in results.items()]
        + [{"network": n, "source": "2020 study (published)", "test accuracy": f"{s['test_accuracy']:.2%}",
            "without flip TTA": "(no TTA)", "test loss": f"{s['test_loss']:.3f}",
            "best val acc (epoch)": f"{s['best_val_accuracy']:.2%} ({s['best_val_epoch']})",
            "epochs": s["epochs"], "train time": f"{s['seconds_per_epoch']} s/epoch", "params": "", "MFLOPs/image": ""}
           for n, s in STUDY["networks"].items() if n in results]
    )  # fmt: skip
    verdict = _verdict(results)
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
            [verdict, f"Reference rows are the published figures of the 2020 study ({STUDY_CITATION})."],
            [comparison],
        ),
        *sections,
        Section("The study's test confusion matrices (published)", [], study_tables),
        Section("Training images", [], [], [("figures/samples.png", "Sample training images per class")]),
        Section("Provenance", [f"```\n{json.dumps(provenance, indent=2)}\n```"]),
    ]
    title = f"fmnist-pl report: {run.path.name}"
    write_text_atomic(run.report(".md"), _markdown(title, head))
    write_text_atomic(run.report(".html"), _html(title, head, run.path))
    summary = {
        "networks": results,
        "verdict": verdict,
        "provenance": provenance,
        "study": {
            n: {k: v for k, v in s.items() if k != "confusion_matrix_test"} for n, s in STUDY["networks"].items()
        },
    }
    write_text_atomic(run.summary, json.dumps(summary, indent=2) + "\n")
    summary["table"] = comparison.to_dict(orient="records")
    return summary


def _verdict(results: dict) -> str:
    """Which network is most accurate (and whether by more than the test set's noise), which is cheapest to
    train, and whether the study's 90 % goal was reached."""
    goal = [n for n, r in results.items() if r["test_accuracy"] >= STUDY_GOAL]
    goal_text = (f"The study's goal of {STUDY_GOAL:.0%} test accuracy is reached by **{', '.join(goal)}**."
                 if goal else f"No network reaches the study's goal of {STUDY_GOAL:.0%} test accuracy.")  # fmt: skip
    if len(results) < 2:
        ((network, r),) = results.items()
        return f"Only {network} was trained: {r['test_accuracy']:.2%} test accuracy. {goal_text}"
    best, runner_up = sorted(results, key=lambda n: results[n]["test_accuracy"], reverse=True)[:2]
    gap = results[best]["test_accuracy"] - results[runner_up]["test_accuracy"]
    # Two standard errors of a difference of two accuracies near 0.9 on the test set: about 0.85 points on 10,000.
    n = results[best]["test_images"]
    noise = 2 * np.sqrt(2 * 0.9 * 0.1 / n)
    if gap < noise:
        accuracy = (f"**{best}** and **{runner_up}** are about as accurate: {results[best]['test_accuracy']:.2%} and "
                    f"{results[runner_up]['test_accuracy']:.2%} ({gap * 100:+.2f} points, within the noise of a "
                    f"{n:,}-image test set).")  # fmt: skip
    else:
        accuracy = (f"**{best}** is the most accurate: {results[best]['test_accuracy']:.2%}, against "
                    f"{results[runner_up]['test_accuracy']:.2%} for {runner_up} ({gap * 100:+.2f} points).")  # fmt: skip
    cheapest = min(results, key=lambda k: results[k]["training_wall_seconds"])
    r = results[cheapest]
    cost = (f"**{cheapest}** took the least time to train: {r['training_wall_seconds']:.0f} s, with "
            f"{r['flops_per_image'] / 1e6:.2f} MFLOPs per image and {r['trainable_parameters']:,} parameters "
            "(training times of networks trained side by side share the machine).")  # fmt: skip
    return f"{accuracy} {cost} {goal_text}"


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


def _html(title: str, sections: list[Section], run_dir: Path) -> str:
    """One self-contained page: styles inline, images embedded as data URIs."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "img{max-width:100%;border:1px solid #eee}pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:0.8em}"
             f"</style></head><body><h1>{html.escape(title)}</h1>"]  # fmt: skip
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
        for path, caption in section.figures:
            parts.append(f"<figure><img src='{png_data_uri(run_dir / path)}' alt='{html.escape(caption)}'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
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
        image.convert("RGB").quantize(colors=64).save(buffer, format="PNG", optimize=True)
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
