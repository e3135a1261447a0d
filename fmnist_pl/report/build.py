"""The report's content: the sections, tables, verdict and headline built from a run's results, then written as
report.md, report.html, summary.json, figures/ and tables/ into the run folder.

`fmnist-pl report <run dir>` rebuilds it without retraining; the pipeline's report step calls the same function.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fmnist_pl.fashion_mnist import CLASS_NAMES, FashionMNISTTensors, load_dataset
from fmnist_pl.io import atomic_write, write_text_atomic
from fmnist_pl.report import figures
from fmnist_pl.report.collect import NetworkResults, RunResults, collect_run, read
from fmnist_pl.report.figures import network_figure, run_figure
from fmnist_pl.report.render import Figure, Section, Table, render_html, render_markdown
from fmnist_pl.report.statistics import confusion_from_predictions, most_confused, paired_comparison, per_class_scores
from fmnist_pl.report.study import STUDY, STUDY_CITATION, STUDY_GOAL

PACKAGES = ("fmnist-pl", "torch", "torchvision", "lightning", "torchmetrics", "prefect", "matplotlib", "pandas")


def summarize(results: RunResults) -> dict:
    """Per network its spreads over seeds; every pair's paired comparison; the verdict that follows from them."""
    summaries = {network: r.summary for network, r in results.networks.items()}
    names = list(results.networks)
    comparisons = [
        {
            "first": a,
            "second": b,
            **paired_comparison(results.networks[a].correct, results.networks[b].correct, results.seeds),
        }
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    return {
        "networks": summaries,
        "comparisons": comparisons,
        "verdict": verdict(summaries, comparisons, len(results.seeds)),
    }


def build_report(run_dir: Path) -> dict:
    """Write report.md, report.html, summary.json, figures/ and tables/ into `run_dir`; return the summary."""
    results = collect_run(run_dir)
    run, seeds, record = results.run, results.seeds, results.record
    data = results.steps["download"]
    tensors = load_dataset(data["source_dir"], require_official=record["settings"].get("require_official", True))
    run.tables.mkdir(parents=True, exist_ok=True)
    summarized = summarize(results)
    summaries, comparisons, conclusion = summarized["networks"], summarized["comparisons"], summarized["verdict"]
    network_sections = [network_section(results, network, tensors) for network in results.networks]
    figures.plot_samples(tensors.train_images[:5000], tensors.train_labels[:5000], run.path / run_figure("samples"))
    figures.plot_validation_accuracy(
        {n: r.histories for n, r in results.networks.items()}, run.path / run_figure("validation_accuracy")
    )
    figures.plot_accuracy_against_cost(summaries, run.path / run_figure("accuracy_against_cost"))
    accuracy, cost = comparison_tables(summaries, seeds)
    provenance = provenance_of(results)
    sections = [
        Section(
            "Comparison",
            [
                conclusion,
                f"Reference rows are the published figures of the 2020 study ({STUDY_CITATION}). Each network "
                f"was trained and tested once per seed ({', '.join(map(str, seeds))})"
                + (
                    "; networks are compared on the same test images, pair by pair (McNemar per seed: the images only the "
                    "first network got right / only the second, and the exact test's p)."
                    if comparisons
                    else "."
                ),
            ],
            # One network has no pair to compare: no tests table at all, rather than an empty one.
            [Table.of(accuracy), Table.of(cost), *([Table.of(tests_table(comparisons))] if comparisons else [])],
            [
                Figure(
                    run_figure("validation_accuracy"),
                    "Validation accuracy per epoch: every network and seed, the "
                    "study's best validation accuracies (dashed) and its 90 % goal (dotted)",
                ),
                Figure(
                    run_figure("accuracy_against_cost"),
                    "Test accuracy against training time and parameters, this run beside the study",
                ),
            ],
        ),
        *network_sections,
        Section(
            "The study's test confusion matrices (published)",
            [],
            [
                Table.of(
                    pd.DataFrame(STUDY["networks"][n]["confusion_matrix_test"], CLASS_NAMES, CLASS_NAMES).rename_axis(
                        f"study {n}: true \\ predicted"
                    )
                )
                for n in summaries
                if n in STUDY["networks"]
            ],
        ),
        Section("Training images", figures=[Figure(run_figure("samples"), "Sample training images per class")]),
        Section("Provenance", code=json.dumps(provenance, indent=2)),
    ]
    title = f"fmnist-pl report: {run.path.name}"
    write_text_atomic(run.report(".md"), render_markdown(title, sections, run.path))
    write_text_atomic(run.report(".html"), render_html(title, headline_cards(summaries), sections, run.path))
    summary = {
        "networks": summaries,
        "seeds": seeds,
        "comparisons": comparisons,
        "verdict": conclusion,
        "provenance": provenance,
        "study": {
            n: {k: v for k, v in s.items() if k != "confusion_matrix_test"} for n, s in STUDY["networks"].items()
        },
    }
    write_text_atomic(run.summary, json.dumps(summary, indent=2) + "\n")
    summary["table"] = accuracy.to_dict(orient="records")
    summary["figures"] = [figure.path for section in sections for figure in section.figures]
    return summary


def percent_spread(spread: dict) -> str:
    """`94.40% ± 0.10 (94.28%–94.48%)`: mean, standard deviation in points, range."""
    std = f" ± {spread['std'] * 100:.2f}" if spread["std"] is not None else ""
    return f"{spread['mean']:.2%}{std} ({spread['min']:.2%}–{spread['max']:.2%})"


def p_value(p: float) -> str:
    return "<0.0001" if p < 1e-4 else f"{p:.4f}" if p < 0.01 else f"{p:.2f}"


def comparison_tables(results: dict, seeds: list[int]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Accuracy per network, then cost per network, each beside the study's published rows: two narrow tables
    rather than one that a Prefect UI's column cuts off."""
    spread = "mean ± sd (min–max)" if len(seeds) > 1 else "one seed"
    study = [(n, s) for n, s in STUDY["networks"].items() if n in results]
    accuracy = pd.DataFrame(
        [
            {
                "network": n,
                "source": "this run",
                f"test accuracy, {spread}": percent_spread(r["test_accuracy"]),
                "without flip TTA": f"{r['test_accuracy_without_flip']['mean']:.2%}"
                if r["test_time_flip"]
                else "(no TTA)",
                "best val acc": f"{r['best_val_accuracy']['mean']:.2%}",
            }
            for n, r in results.items()
        ]
        + [
            {
                "network": n,
                "source": "2020 study",
                f"test accuracy, {spread}": f"{s['test_accuracy']:.2%}",
                "without flip TTA": "(no TTA)",
                "best val acc": f"{s['best_val_accuracy']:.2%}",
            }
            for n, s in study
        ]
    )
    cost = pd.DataFrame(
        [
            {
                "network": n,
                "source": "this run",
                "train time": f"{r['training_wall_seconds']['mean']:.0f} s",
                "params": f"{r['trainable_parameters']:,}",
                "MFLOPs/image": f"{r['flops_per_image'] / 1e6:.2f}",
            }
            for n, r in results.items()
        ]
        + [
            {
                "network": n,
                "source": "2020 study",
                "train time": f"{s['seconds_per_epoch']} s/epoch × {s['epochs']}",
                "params": "",
                "MFLOPs/image": "",
            }
            for n, s in study
        ]
    )
    return accuracy, cost


def tests_table(comparisons: list[dict]) -> pd.DataFrame:
    """The paired tests: accuracy difference, its bootstrap interval, McNemar per seed, and the decision."""
    return pd.DataFrame(
        [
            {
                "comparison": f"{c['first']} − {c['second']}",
                "difference": f"{c['difference'] * 100:+.2f} points",
                f"{c['confidence']:.0%} interval": f"[{c['ci_low'] * 100:+.2f}, {c['ci_high'] * 100:+.2f}]",
                "McNemar per seed": "; ".join(
                    f"seed {m['seed']}: {m['only_first_correct']}/{m['only_second_correct']}, p={p_value(m['p_value'])}"
                    for m in c["mcnemar"]
                ),
                "significant": "yes" if c["significant"] else "no",
            }
            for c in comparisons
        ]
    )


def network_section(results: RunResults, network: str, tensors: FashionMNISTTensors) -> Section:
    """A network's details, from its first seed: curves, per-class scores, confusion matrices, mistakes."""
    run, seed = results.run, results.seeds[0]
    details: NetworkResults = results.networks[network]
    r, evaluation, history = details.summary, details.first_evaluation, details.histories[seed]
    test_matrix = pd.read_csv(read(evaluation.confusion_test, "test confusion matrix"), index_col=0).to_numpy()
    train_predictions = pd.read_csv(read(evaluation.predictions("train"), "train predictions"), index_col="index")
    train_matrix = confusion_from_predictions(train_predictions)
    scores = per_class_scores(test_matrix)
    for name, table in (
        (f"{network}_confusion_matrix_test.csv", pd.DataFrame(test_matrix, CLASS_NAMES, CLASS_NAMES)),
        (f"{network}_confusion_matrix_train.csv", pd.DataFrame(train_matrix, CLASS_NAMES, CLASS_NAMES)),
        (f"{network}_per_class_test.csv", scores),
    ):
        with atomic_write(run.tables / name) as tmp:
            table.to_csv(tmp)
    figure = {kind: network_figure(network, kind) for kind in figures.NETWORK_FIGURES}
    best_epoch = figures.plot_curves(history, network, run.path / figure["curves"])
    figures.plot_confusion(test_matrix, f"{network}: test confusion matrix", run.path / figure["confusion_test"])
    figures.plot_confusion(
        train_matrix, f"{network}: training-set confusion matrix", run.path / figure["confusion_train"]
    )
    figures.plot_gallery(
        tensors.test_images,
        details.first_predictions,
        f"{network}: most confident mistakes on the test set",
        run.path / figure["mistakes"],
    )
    s = r["seeds"][str(seed)]
    tta = (
        f" with flip test-time augmentation ({s['test_accuracy_without_flip']:.2%} without)"
        if r["test_time_flip"]
        else ""
    )
    captions = {
        "curves": f"Training curves (seed {seed})",
        "confusion_test": f"Test confusion matrix (seed {seed}; counts and % of the true class)",
        "confusion_train": f"Training-set confusion matrix (seed {seed})",
        "mistakes": f"Most confident mistakes (seed {seed}; true, predicted, confidence)",
    }
    return Section(
        network,
        [
            f"Over {len(r['seeds'])} seed(s), test accuracy {percent_spread(r['test_accuracy'])}. The details below are "
            f"seed {seed}'s: test accuracy **{s['test_accuracy']:.2%}**{tta} on {r['test_images']:,} images "
            f"(best-validation checkpoint, epoch {best_epoch} of {s['epochs']}; validation accuracy "
            f"{s['best_val_accuracy']:.2%}). Training-set accuracy of that checkpoint: "
            f"{np.trace(train_matrix) / train_matrix.sum():.2%}.",
            f"{r['trainable_parameters']:,} trainable parameters, {r['flops_per_image'] / 1e6:.2f} MFLOPs per image "
            f"(forward), trained in {s['training_wall_seconds']:.0f} s ({s['mean_epoch_seconds']:.1f} s per epoch); "
            f"the test set ran at {r['test_images_per_second']:,} images/s.",
            "Per-class scores on the test set, then the most confused pairs:",
        ],
        [Table.of(scores), Table.of(most_confused(test_matrix))],
        [Figure(figure[kind], captions[kind]) for kind in figures.NETWORK_FIGURES],
    )


def headline_cards(results: dict) -> list[dict]:
    """The report's first block: each network's test accuracy against the study and the 90 % goal."""
    cards = []
    for network, r in results.items():
        accuracy, study = r["test_accuracy"], STUDY["networks"].get(network)
        cards.append(
            {
                "network": network,
                "accuracy": accuracy["mean"],
                "spread": (
                    f"± {accuracy['std'] * 100:.2f} over {len(r['seeds'])} seeds"
                    if accuracy["std"] is not None
                    else "one seed"
                ),
                "against": (
                    f"study: {study['test_accuracy']:.2%} ({(accuracy['mean'] - study['test_accuracy']) * 100:+.2f} "
                    "points)"
                    if study
                    else "not in the study"
                ),
                "reached": accuracy["mean"] >= STUDY_GOAL,
            }
        )
    return cards


def provenance_of(results: RunResults) -> dict:
    """Where the numbers came from: settings, configs, data, packages, machine, each step's time."""
    record, steps = results.record, results.steps
    data = steps["download"]
    return {
        "run": record.get("run_dir"),
        "started": record.get("started"),
        "settings": record["settings"],
        "configs": record.get("configs", {}),
        "data source": data["source_dir"],
        "data sha256": data["sha256"],
        "packages": versions(),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, CUDA {'available' if torch.cuda.is_available() else 'not available'}",
        "step wall seconds": {s: v.get("wall_seconds") for s, v in steps.items() if isinstance(v, dict)},
        "cached steps": [s for s, v in steps.items() if isinstance(v, dict) and v.get("cached")],
    }


def versions() -> dict[str, str]:
    """The installed versions of the packages the numbers depend on."""
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def verdict(results: dict, comparisons: list[dict], seeds: int) -> str:
    """Which network is most accurate, but only where a paired test says the difference is real; which is cheapest
    to train; whether the study's 90 % goal was reached."""
    mean = {n: r["test_accuracy"]["mean"] for n, r in results.items()}
    goal = [n for n in results if mean[n] >= STUDY_GOAL]
    goal_text = (
        f"The study's goal of {STUDY_GOAL:.0%} test accuracy is reached by **{', '.join(goal)}**."
        if goal
        else f"No network reaches the study's goal of {STUDY_GOAL:.0%} test accuracy."
    )
    if len(results) < 2:
        ((network, _),) = results.items()
        return f"Only {network} was trained: {mean[network]:.2%} mean test accuracy. {goal_text}"
    sentences = []
    for c in sorted(comparisons, key=lambda c: -abs(c["difference"])):
        better, worse = (c["first"], c["second"]) if c["difference"] >= 0 else (c["second"], c["first"])
        low, high = (c["ci_low"], c["ci_high"]) if better == c["first"] else (-c["ci_high"], -c["ci_low"])
        interval = (
            f"difference {abs(c['difference']) * 100:.2f} points, {c['confidence']:.0%} interval "
            f"[{low * 100:+.2f}, {high * 100:+.2f}]"
        )
        if c["significant"]:
            sentences.append(
                f"**{better}** beats {worse}: {mean[better]:.2%} against {mean[worse]:.2%} ({interval}; "
                f"McNemar p < 0.05 on each of {seeds} seed(s))."
            )
        else:
            sentences.append(
                f"{better} and {worse}: no detectable difference ({mean[better]:.2%} against "
                f"{mean[worse]:.2%}; {interval})."
            )
    winners = {c["first"] if c["difference"] > 0 else c["second"] for c in comparisons if c["significant"]}
    losers = {c["second"] if c["difference"] > 0 else c["first"] for c in comparisons if c["significant"]}
    best = [
        n
        for n in winners
        if n not in losers and all(c["significant"] for c in comparisons if n in (c["first"], c["second"]))
    ]
    lead = (
        f"**{best[0]}** is the most accurate network, significantly ahead of every other."
        if best
        else "No network is significantly more accurate than every other."
    )
    cheapest = min(results, key=lambda k: results[k]["training_wall_seconds"]["mean"])
    r = results[cheapest]
    cost = (
        f"**{cheapest}** took the least time to train: {r['training_wall_seconds']['mean']:.0f} s, with "
        f"{r['flops_per_image'] / 1e6:.2f} MFLOPs per image and {r['trainable_parameters']:,} parameters "
        "(trainings run side by side share the machine)."
    )
    return " ".join([lead, *sentences, cost, goal_text])
