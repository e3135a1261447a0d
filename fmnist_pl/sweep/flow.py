"""The sweep as a Prefect flow: Optuna asks for trials, each trial is a task that runs `fmnist-pl fit` with the
trial's options into a cached step folder, and the flow tells Optuna how it went (ask-and-tell, so that trials run
as Prefect tasks, on this machine or on Dask workers, rather than inside `study.optimize`)."""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from the real annotations.
import json
import os
import socket
from pathlib import Path

import optuna
import pandas as pd
import psutil
from optuna.distributions import BaseDistribution
from optuna.trial import TrialState
from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, wait

from fmnist_pl import layout
from fmnist_pl.pipeline.cluster import step_runner
from fmnist_pl.pipeline.processes import begin_run, stopping
from fmnist_pl.pipeline.run_record import DataRecord, StepResult
from fmnist_pl.pipeline.step_cache import training_key
from fmnist_pl.pipeline.tasks import cached_step, download_data, fit_into, fit_options, step_task
from fmnist_pl.sweep.confirm import confirm_winner
from fmnist_pl.sweep.outputs import write_best_config, write_sweep_outputs
from fmnist_pl.sweep.pruning import PRUNED_FILE, median_pruner
from fmnist_pl.sweep.settings import SweepSettings, open_storage
from fmnist_pl.sweep.space import load_space, option_value

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WARMUP_EPOCHS = 1  # no trial is pruned on its first epoch's accuracy alone


@step_task("trial-{number}", backoff_seconds=10)
def run_trial(
    number: int,
    trial_id: int,
    params: dict,
    settings: SweepSettings,
    data: DataRecord,
    steps_dir: str,
    threads: int | None = None,
) -> StepResult:
    """One trial: `fmnist-pl fit` with the trial's options, pruned at the end of an epoch if the study's pruner says
    so. Its folder is keyed like a training step's on everything that decides the result (the pruning callback's
    study and trial aside): a trial with the same options is trained once, across sweeps too, and a trial that was
    running when its sweep was killed resumes from its last.ckpt when it is asked again."""
    pipeline = settings.pipeline()
    config = pipeline.config_file(settings.network)
    overrides = [f"--{option}={option_value(value)}" for option, value in sorted(params.items())]
    fit = fit_options(pipeline) + overrides
    key = training_key(settings.network, settings.seed, config, fit, data, threads)
    work = layout.TrainingFolder(layout.step_folder(Path(steps_dir), "trial", settings.network, settings.seed, key))
    pruning = {
        "class_path": "fmnist_pl.sweep.pruning.OptunaPruning",
        "init_args": {
            "storage": settings.storage_url(),
            "study_name": settings.study_name(),
            "trial_id": trial_id,
            "prune_after": settings.prune_after,
            "warmup_epochs": WARMUP_EPOCHS,
        },
    }

    def train(lock: object) -> dict:
        options = [*fit, f"--trainer.callbacks+={json.dumps(pruning)}"]
        resumed = fit_into(work, config, options, settings.seed, data, lock, threads)
        return {"network": settings.network, "seed": settings.seed, "resumed": resumed}

    outputs = [work.best_checkpoint, work.last_checkpoint, work.history]
    return cached_step(work.path, f"trial {number}", outputs, train)


def trial_outcome(step: StepResult) -> dict:
    """What a trial's folder says: its best validation accuracy, the accuracy per epoch, and whether it was pruned."""
    folder = layout.TrainingFolder(Path(step.dir))
    history = pd.read_csv(folder.history)
    return {
        "value": float(history["val/acc"].max()),
        "curve": [float(v) for v in history["val/acc"]],
        "pruned": (folder.path / PRUNED_FILE).is_file(),
        "epochs": len(history),
        "seconds": step.wall_seconds,
        "dir": step.dir,
        "cached": step.cached,
    }


def fail_and_ask_again(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: object) -> None:
    """A trial that will not finish (its sweep stopped or died): failed, and its options asked again first, so that
    the next ask resumes its folder from the last checkpoint."""
    storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def requeue_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage) -> list[int]:
    """Trials left running by a sweep on this machine that is gone (killed): marked failed, and their options asked
    again, so that they resume from their last checkpoints. Running trials of live sweeps (another machine sharing
    the study, or a sweep still running here) are left alone."""
    requeued = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("sweep", {})
        if owner.get("host") != socket.gethostname() or psutil.pid_exists(owner.get("pid", -1)):
            continue
        fail_and_ask_again(study, storage, trial)
        requeued.append(trial.number)
    return requeued


def tell(study: optuna.Study, storage: optuna.storages.BaseStorage, trial: optuna.Trial, outcome: dict) -> None:
    """Record a trial's result: its per-epoch accuracies where the fit did not report them itself (a reused or a
    resumed fit), its time and epochs, and its state."""
    reported = storage.get_trial(trial._trial_id).intermediate_values
    for epoch, value in enumerate(outcome["curve"]):
        if epoch not in reported:
            trial.report(value, step=epoch)
    for name in ("epochs", "seconds", "dir", "cached"):
        trial.set_user_attr(name, outcome[name])
    if outcome["pruned"]:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, outcome["value"])


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@flow(name="fmnist-sweep", log_prints=True)
def sweep(settings: SweepSettings = SweepSettings()) -> str:  # noqa: B008 - immutable, shown in the UI
    """Tune one network's recipe: `trials` trials, `parallel` at a time; returns the sweep's folder."""
    settings.pipeline().check_hardware()
    begin_run()
    logger = get_run_logger()
    space: dict[str, BaseDistribution] = load_space(settings.space_file())
    output = Path(settings.output_dir).resolve()
    folder = settings.sweep_dir()
    folder.mkdir(parents=True, exist_ok=True)
    storage = open_storage(settings.storage_url())
    study = optuna.create_study(
        study_name=settings.study_name(),
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        pruner=median_pruner(settings.prune_after, WARMUP_EPOCHS),
    )
    # Seeded, and on from where the study is: a resumed sweep's sampler does not replay the first one's draws.
    study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.get_trials(deepcopy=False)))
    if requeued := requeue_stale_trials(study, storage):
        logger.warning(f"trials {requeued} were running when their sweep was killed: marked failed and asked again")
    print(
        f"fmnist-pl sweep: study {study.study_name!r} ({finished_trials(study)} of {settings.trials} trials "
        f"finished) in {settings.storage_url(hide_password=True)}; folder {folder}"
    )
    data = download_data.submit(settings.data_dir, settings.require_official).result()
    steps_dir = str(output / layout.STEPS_DIR)
    running: dict[PrefectFuture, optuna.Trial] = {}
    failures = 0
    with step_runner(settings.dask_address, settings.dask_workers) as steps:
        steps.check_workers(output, data.source_dir)
        threads = steps.worker_threads() or max(1, (os.cpu_count() or 1) // settings.parallel)
        try:
            while True:
                while len(running) < settings.parallel and finished_trials(study) + len(running) < settings.trials:
                    trial = study.ask(space)
                    trial.set_user_attr("sweep", {"host": socket.gethostname(), "pid": os.getpid()})
                    inputs = dict(
                        number=trial.number,
                        trial_id=trial._trial_id,
                        params=trial.params,
                        settings=settings,
                        data=data,
                        steps_dir=steps_dir,
                        threads=threads,
                    )
                    running[steps.submit(run_trial, inputs, threads=threads)] = trial
                if not running:
                    break
                done = set()
                while not done:
                    done = wait(list(running), timeout=1).done
                for future in done:
                    trial = running.pop(future)
                    try:
                        outcome = trial_outcome(future.result())
                    except Exception as e:
                        # A stop signal's handler can be swallowed by the Prefect call it lands in; the trials that
                        # it stopped then fail here. They are stopped, not failed: asked again like the others.
                        if stopping():
                            running[future] = trial
                            raise
                        study.tell(trial, state=TrialState.FAIL)
                        failures += 1
                        print(f"trial {trial.number}: failed: {e}")
                        if failures > settings.trials:
                            raise RuntimeError(f"{failures} trials failed; see their logs in {steps_dir}") from e
                        continue
                    tell(study, storage, trial, outcome)
                    print(
                        f"trial {trial.number}: {'pruned' if outcome['pruned'] else 'complete'}, best val acc "
                        f"{outcome['value']:.4f} in {outcome['epochs']} epoch(s), {outcome['seconds']:.0f} s"
                        f"{' (reused)' if outcome['cached'] else ''}"
                    )
        except BaseException:  # stopped (Ctrl-C, kill) or failed: no trial left running, each asked again next time
            steps.stop()
            for trial in running.values():
                fail_and_ask_again(study, storage, trial)
            raise
        best_yaml = write_best_config(study, settings, folder)
        confirmation = None
        if settings.confirm_seeds:
            confirmation = confirm_winner(settings, best_yaml, data, steps_dir, steps)
            print(f"fmnist-pl sweep: confirmation on the test set: {confirmation['verdict']}")
    best = write_sweep_outputs(study, settings, folder, confirmation)
    print(f"fmnist-pl sweep: best trial {best['number']}, val acc {best['value']:.4f}; config {folder / 'best.yaml'}")
    return str(folder)
