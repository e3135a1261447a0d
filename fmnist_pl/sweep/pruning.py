"""The callback that lets Optuna prune a trial inside its `fmnist-pl fit`, at the end of an epoch.

optuna-integration's PyTorchLightningPruningCallback takes the live `optuna.trial.Trial` object, which exists only
in the sweep flow's process; a trial's fit runs in a subprocess started by the CLI, which can pass only plain
values. This callback rebuilds the trial from the study's storage URL, name and the trial's id, reports each
epoch's validation accuracy to it, and stops the fit when the pruner says so.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import lightning as L
from lightning.pytorch.callbacks import Callback

from fmnist_pl.callbacks import run_dir
from fmnist_pl.io import write_text_atomic

if TYPE_CHECKING:
    import optuna

PRUNED_FILE = "pruned.json"  # in the fit's folder: the epoch at which the pruner stopped it


def median_pruner(prune_after: int, warmup_epochs: int) -> optuna.pruners.MedianPruner:
    """The sweep's pruner: a trial stops when its accuracy after an epoch is below the median of the finished
    trials' after the same epoch, once `prune_after` trials have finished, and never in its first `warmup_epochs`."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=prune_after, n_warmup_steps=warmup_epochs)


class OptunaPruning(Callback):
    """Report `monitor` to trial `trial_id` of `study_name` in `storage` after every validation of a fit; stop
    the fit (cleanly, its checkpoints and history written) when the sweep's median pruner prunes the trial. The
    pruner's settings come with the trial: a study's storage keeps its trials, not its pruner."""

    def __init__(
        self,
        storage: str,
        study_name: str,
        trial_id: int,
        prune_after: int = 3,
        warmup_epochs: int = 1,
        monitor: str = "val/acc",
    ) -> None:
        self.storage, self.study_name, self.trial_id, self.monitor = storage, study_name, trial_id, monitor
        self.prune_after, self.warmup_epochs = prune_after, warmup_epochs
        self._trial = None

    def trial(self) -> optuna.trial.Trial:
        """The trial, loaded from the storage on first use (optuna loads only in a sweep's fits)."""
        if self._trial is None:
            import optuna

            pruner = median_pruner(self.prune_after, self.warmup_epochs)
            study = optuna.load_study(study_name=self.study_name, storage=self.storage, pruner=pruner)
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = run_dir(trainer)  # every rank: a collective under DDP
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        prune = False
        if trainer.is_global_zero:
            trial = self.trial()
            trial.report(float(trainer.callback_metrics[self.monitor]), step=trainer.current_epoch)
            prune = trial.should_prune()
        if trainer.strategy.broadcast(prune):
            trainer.should_stop = True
            if trainer.is_global_zero and directory is not None:
                epochs = trainer.current_epoch + 1
                write_text_atomic(directory / PRUNED_FILE, json.dumps({"epochs": epochs}) + "\n")
                print(f"[{pl_module.hparams.network}] pruned by Optuna after epoch {epochs}", flush=True)
