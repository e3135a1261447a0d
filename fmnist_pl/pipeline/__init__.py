"""The Prefect pipeline, one job per file: settings.py (what a run trains), flow.py (the flow), tasks.py (its
steps), step_cache.py (step keys, reuse, locks), processes.py (each step's `fmnist-pl` subprocess), scheduling.py
(threads and order of trainings on a CPU), run_record.py (run folders and run.json), prefect_server.py (the
run's Prefect server) and command.py (the command line). `flows/full_pipeline.py` is the entry point."""
