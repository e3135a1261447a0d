"""The fmnist-pl pipeline as a Prefect flow: download → train every network → evaluate each → comparison report.

    python flows/full_pipeline.py                           # one run, no Prefect server needed
    python flows/full_pipeline.py --help                    # every option (fmnist_pl/pipeline/settings.py)
    python flows/full_pipeline.py serve --cron "0 3 * * *"  # a scheduled deployment, shown in the Prefect UI

This file is the entry point users run and Prefect deploys (`prefect.yaml`); the pipeline lives in
`fmnist_pl/pipeline/`: the flow (flow.py), its tasks (tasks.py), the step cache (step_cache.py), child processes
(processes.py), CPU scheduling (scheduling.py), run records (run_record.py) and this command line (command.py,
launch.py).
"""

from fmnist_pl.pipeline.command import main

if __name__ == "__main__":
    main()  # first: wrong options are refused before Lightning and Prefect load

from fmnist_pl.pipeline.flow import full_pipeline  # noqa: E402 - what Prefect deploys (prefect.yaml's entrypoint)

__all__ = ["full_pipeline", "main"]
