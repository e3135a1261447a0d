"""Hyper-parameter sweeps: Optuna studies whose trials are `fmnist-pl fit` runs, as a Prefect flow (flows/sweep.py)."""
