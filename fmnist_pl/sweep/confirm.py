"""The winner, confirmed: a sweep's best.yaml and the network's current default config, each trained on the same
seeds and evaluated on the test set, compared with the report's paired tests. The validation split chose the
winner; the test set only confirms it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from fmnist_pl import layout
from fmnist_pl.pipeline.cluster import StepRunner
from fmnist_pl.pipeline.processes import current_run
from fmnist_pl.pipeline.run_record import DataRecord
from fmnist_pl.pipeline.scheduling import TrainingQueue
from fmnist_pl.pipeline.tasks import evaluate_model, train_model
from fmnist_pl.report.statistics import paired_comparison


def verdict(comparison: dict) -> str:
    """The confirmation's word, from the bootstrap interval of the accuracy difference (best minus default) alone."""
    if comparison["ci_low"] > 0:
        return "better: the tuned config beats the default on the test set"
    if comparison["ci_high"] < 0:
        return "worse: keep the default"
    return "no detectable difference, keep the default"


def confirm_winner(settings: object, best_config: Path, data: DataRecord, steps_dir: str, steps: StepRunner) -> dict:
    """Train and evaluate `best_config` and the default config on `settings.confirm_seeds`; their test accuracies
    per seed, the paired comparison (McNemar per seed, a bootstrap interval) and the verdict."""
    pipeline = settings.pipeline().model_copy(update={"seeds": list(settings.confirm_seeds)})
    network, seeds = settings.network, pipeline.seeds
    configs = {"best": str(best_config), "default": str(pipeline.config_file(network))}
    threads = steps.worker_threads() or max(1, (os.cpu_count() or 1) // settings.parallel)
    # On this machine, `parallel` trainings at a time as in the sweep; on a cluster, Dask's scheduler decides.
    current_run().queue = None if steps.runner else TrainingQueue(threads * settings.parallel)
    plan = [(name, seed) for seed in seeds for name in configs]

    def inputs(name: str, seed: int) -> dict:  # what a training and its evaluation both take
        return dict(network=network, seed=seed, settings=pipeline, data=data, steps_dir=steps_dir, config=configs[name])

    trainings = {
        (name, seed): steps.submit(
            train_model.with_options(task_run_name=f"confirm-{name}-{network}-seed{seed}"),
            dict(**inputs(name, seed), threads=threads, ticket=ticket),
            threads=threads,
        )
        for ticket, (name, seed) in enumerate(plan)
    }
    evaluations = {
        (name, seed): steps.submit(
            evaluate_model.with_options(task_run_name=f"confirm-evaluate-{name}-{network}-seed{seed}"),
            dict(**inputs(name, seed), trained=trainings[name, seed]),
        )
        for name, seed in plan
    }
    correct: dict[str, list[np.ndarray]] = {name: [] for name in configs}
    accuracy: dict[str, list[float]] = {name: [] for name in configs}
    for name, seed in plan:
        evaluated = layout.EvaluationFolder(Path(evaluations[name, seed].result().dir))
        predictions = pd.read_csv(evaluated.predictions("test"))
        right = (predictions["label"] == predictions["predicted"]).to_numpy()
        correct[name].append(right)
        accuracy[name].append(float(right.mean()))
    comparison = paired_comparison(np.stack(correct["best"]), np.stack(correct["default"]), seeds)
    return {"seeds": seeds, "test_accuracy": accuracy, "comparison": comparison, "verdict": verdict(comparison)}
