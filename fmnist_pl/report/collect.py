"""Collecting a finished run's files for the report: its record, and each network's and seed's training history,
test metrics and predictions, read from the run folder's layout (never retyped numbers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fmnist_pl.errors import DataError
from fmnist_pl.layout import EvaluationFolder, RunFolder, step_name
from fmnist_pl.report.statistics import describe_spread


def read(path: Path, what: str) -> Path:
    """`path`, or the error that names what the run folder lacks."""
    if not path.exists():
        raise DataError(f"{path} is missing: the run folder lacks the {what}; was the run completed?")
    return path


@dataclass
class NetworkResults:
    """One network's results over the run's seeds, and its first seed's files (which the report details)."""

    summary: dict  # what summary.json says of it
    histories: dict[int, pd.DataFrame]  # per seed
    correct: np.ndarray  # seeds × test images: True where classified right
    first_evaluation: EvaluationFolder
    first_predictions: pd.DataFrame  # the first seed's test predictions


@dataclass
class RunResults:
    run: RunFolder
    record: dict
    networks: dict[str, NetworkResults] = field(default_factory=dict)

    @property
    def seeds(self) -> list[int]:
        return self.record.get("seeds", [0])

    @property
    def steps(self) -> dict:
        return self.record["steps"]


def read_record(run: RunFolder) -> dict:
    """The run's record, checked to be a complete run's."""
    try:
        record = json.loads(read(run.record, "run record (run.json)").read_text())
        steps, networks, seeds, _ = record["steps"], record["networks"], record.get("seeds", [0]), record["settings"]
    except (ValueError, KeyError, TypeError) as e:  # not JSON, cut off, or not a run record
        raise DataError(
            f"{run.record} is damaged or not a pipeline run record ({type(e).__name__}: {e}); "
            "run the pipeline again to write a new run"
        ) from e
    missing = [
        step_name(kind, network, seed)
        for network in networks
        for seed in seeds
        for kind in ("train", "evaluate")
        if step_name(kind, network, seed) not in steps
    ]
    if "download" not in steps or missing:
        failed = f", failed at {record['failed_step']}" if record.get("failed_step") else ""
        raise DataError(
            f"run {run.path.name} is incomplete (status {record.get('status', 'unknown')}{failed}): no result for "
            f"{(missing or ['download'])[0]}{f' and {len(missing) - 1} more steps' if len(missing) > 1 else ''}; "
            "run the pipeline again with the same options (its finished steps are reused)"
        )
    return record


def collect_run(run_dir: Path) -> RunResults:
    """Every result the report shows, from the run folder's files."""
    run = RunFolder(Path(run_dir).resolve())  # `outputs/latest` names the run it points at
    results = RunResults(run, read_record(run))
    for network in results.record["networks"]:
        results.networks[network] = collect_network(results, network)
    return results


def collect_network(results: RunResults, network: str) -> NetworkResults:
    """One network's per-seed results and spreads."""
    run, seeds = results.run, results.seeds
    per_seed, histories, correct, first = {}, {}, [], {}
    for seed in seeds:
        training, evaluation = run.training(network, seed), run.evaluation(network, seed)
        what = f"{network} seed {seed}"
        history = pd.read_csv(read(training.history, f"{what} training history"))
        test = json.loads(read(evaluation.test_metrics, f"{what} test metrics").read_text())
        predictions = pd.read_csv(read(evaluation.predictions("test"), f"{what} test predictions"), index_col="index")
        histories[seed] = history
        correct.append((predictions["label"] == predictions["predicted"]).to_numpy())
        best_row = history.loc[history["val/acc"].idxmax()]
        per_seed[str(seed)] = {  # str: the same keys in memory as in summary.json
            "test_accuracy": test["accuracy"],
            "test_accuracy_without_flip": test.get("accuracy_without_flip", test["accuracy"]),
            "test_loss": test["loss"],
            "best_val_accuracy": float(best_row["val/acc"]),
            "best_val_epoch": int(best_row["epoch"]) + 1,
            "epochs": len(history),
            "training_wall_seconds": results.steps[step_name("train", network, seed)]["wall_seconds"],
            "mean_epoch_seconds": float(history["epoch_seconds"].mean()),
        }
        if seed == seeds[0]:
            first = {"test": test, "predictions": predictions, "evaluation": evaluation}
    values = list(per_seed.values())
    summary = {
        "seeds": per_seed,
        **{
            key: describe_spread([v[key] for v in values])
            for key in ("test_accuracy", "test_accuracy_without_flip", "training_wall_seconds", "best_val_accuracy")
        },
        "test_time_flip": first["test"].get("test_time_flip", False),
        "test_images": first["test"]["images"],
        "trainable_parameters": first["test"]["trainable_parameters"],
        "flops_per_image": first["test"]["flops_per_image"],
        "test_images_per_second": first["test"]["test_images_per_second"],
        "test_precision": first["test"].get("precision", "32-true"),
    }
    return NetworkResults(summary, histories, np.stack(correct), first["evaluation"], first["predictions"])
