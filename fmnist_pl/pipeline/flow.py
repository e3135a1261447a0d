"""The Prefect flow: download → train every network once per seed → evaluate each → comparison report."""

# No `from __future__ import annotations`: Prefect builds the flow's parameter model from the real annotations,
# and a served run cannot resolve them from strings.
import contextlib
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture

from fmnist_pl import layout
from fmnist_pl.errors import ConfigError
from fmnist_pl.pipeline.cluster import StepRunner, step_runner
from fmnist_pl.pipeline.processes import begin_run, current_run
from fmnist_pl.pipeline.run_record import (
    DataRecord,
    RunRecord,
    StepResult,
    link,
    mark_dead_runs,
    new_run_dir,
    point_latest_at,
)
from fmnist_pl.pipeline.scheduling import TrainingQueue, cpu_schedule
from fmnist_pl.pipeline.settings import PipelineSettings
from fmnist_pl.pipeline.tasks import download_data, evaluate_model, export_model, train_model, write_report


@flow(name="fmnist-full-pipeline", log_prints=True)
def full_pipeline(settings: PipelineSettings = PipelineSettings()) -> str:  # noqa: B008 - immutable, shown in the UI
    """Download → train → evaluate → report; returns the run folder."""
    settings.check_hardware()  # also where a served run lands: the worker's machine decides
    begin_run()
    context = current_run()
    configs = {network: str(settings.config_file(network)) for network in settings.networks()}  # fails before work
    output = Path(settings.output_dir).resolve()
    run = layout.RunFolder(new_run_dir(output))
    for dead in mark_dead_runs(output, by=run.path):
        get_run_logger().warning(f"run {dead.name} was killed before it finished: marked as such in its run.json")
    steps_dir = str(output / layout.STEPS_DIR)
    record = context.record = RunRecord(
        run, networks=list(configs), seeds=settings.seeds, settings=settings.model_dump(), configs=configs
    )
    print(f"fmnist-pl pipeline: run folder {run.path}")
    stack = contextlib.ExitStack()

    def finish(step: str, future: PrefectFuture) -> StepResult | DataRecord:
        """The step's result, recording in run.json which step failed and why if it did."""
        try:
            result = future.result()
        except Exception as e:
            record.end("failed", e, step=step)
            raise
        record.step_done(step, result)
        return result

    steps = StepRunner()
    try:
        data = finish("download", download_data.submit(settings.data_dir, settings.require_official))
        steps = stack.enter_context(step_runner(settings.dask_address, settings.dask_workers))
        steps.check_workers(output, data.source_dir)
        # Costliest network first within each seed: the longest training starts first and sets the pace. On a
        # cluster each worker's threads decide a training's, and Dask's scheduler the order (no queue).
        gpus = settings.gpus_per_training() if steps.runner else 0
        networks, budget, threads = cpu_schedule(settings, steps.worker_threads(gpus))
        context.queue = None if steps.runner else TrainingQueue(budget)
        runs = [(network, seed) for seed in settings.seeds for network in networks]
        trainings = {
            (n, s): steps.submit(
                train_model,
                dict(
                    network=n,
                    seed=s,
                    settings=settings,
                    data=data,
                    steps_dir=steps_dir,
                    threads=threads.get(n),
                    ticket=ticket,
                ),
                threads=threads.get(n) or 1,
                gpus=gpus,
                priority=len(runs) - ticket,
            )
            for ticket, (n, s) in enumerate(runs)
        }
        step_inputs = dict(settings=settings, data=data, steps_dir=steps_dir)
        evaluations = {
            (n, s): steps.submit(
                evaluate_model, dict(network=n, seed=s, trained=trainings[n, s], **step_inputs), gpus=min(gpus, 1)
            )
            for n, s in runs
        }
        first = settings.seeds[0]  # each network's first-seed model is exported for use outside PyTorch
        exports = {
            n: steps.submit(export_model, dict(network=n, seed=first, trained=trainings[n, first], **step_inputs))
            for n in (networks if settings.export else [])
        }
        for network, seed in runs:  # the run folder shows each training's step folders, which stay shared and cached
            trained = finish(layout.step_name("train", network, seed), trainings[network, seed])
            link(run.training(network, seed).path, Path(trained.dir))
        for network, seed in runs:
            evaluated = finish(layout.step_name("evaluate", network, seed), evaluations[network, seed])
            link(run.evaluation(network, seed).path, Path(evaluated.dir))
        for network, export in exports.items():
            exported = finish(layout.step_name("export", network, first), export)
            link(run.export(network), Path(exported.dir))
        finish("report", write_report.submit(str(run.path)))
    except BaseException as e:  # stopped (SIGTERM, Ctrl-C) or failed: stop every training, and say so
        steps.stop()
        if record.running:  # a worker refused before any step failed, or the flow was stopped
            record.end("failed" if isinstance(e, ConfigError) else "stopped", e)
        raise
    finally:
        stack.close()  # the run's Dask client, or its LocalCluster
    record.end("completed")
    point_latest_at(run.path)
    models = f", ONNX models in {run.path / layout.EXPORT_DIR}" if exports else ""
    print(f"fmnist-pl pipeline: done, report at {run.report('.md')}{models}")
    return str(run.path)
