"""Hyper-parameter sweeps as a Prefect flow: Optuna on a real database, trials as Prefect tasks, pruned, resumable.

    python flows/sweep.py --network dense --trials 20 --parallel 2     # SQLite in outputs/sweeps/optuna.db
    python flows/sweep.py --network cnn --storage postgresql://USER@HOST/DB   # one study shared by machines
    python flows/sweep.py --help                                        # every option (fmnist_pl/sweep/settings.py)

The sweep lives in `fmnist_pl/sweep/`: the flow (flow.py), search spaces (space.py, configs/search/*.yaml), the
pruning callback inside each fit (pruning.py), what it writes (outputs.py) and this command line (command.py).
"""

from fmnist_pl.sweep.command import main

if __name__ == "__main__":
    main()  # first: wrong options, spaces and storages are refused before Lightning and Prefect load

from fmnist_pl.sweep.flow import sweep  # noqa: E402 - what Prefect deploys (prefect.yaml's entrypoint)

__all__ = ["main", "sweep"]
