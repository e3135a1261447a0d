"""The `fmnist-pl evaluate` command: a trained network's test metrics, test confusion matrix and predictions on
the splits asked for, in one process (what the pipeline's evaluation step and the report need).

    fmnist-pl evaluate --config fast_bn_cnn --ckpt_path best.ckpt --predict_splits [test,train]

LightningCLI turns a Trainer method into a subcommand, its arguments into options; this Trainer adds that method.
"""

from __future__ import annotations

import lightning as L

from fmnist_pl.data import Split


class FashionMNISTTrainer(L.Trainer):
    """Lightning's Trainer plus `evaluate`."""

    def evaluate(
        self,
        model: L.LightningModule,
        datamodule: L.LightningDataModule,
        ckpt_path: str,
        predict_splits: list[Split] | None = None,
    ) -> None:
        """Test (its metrics and, from the same forward passes, the test predictions), then predict each other split
        of `predict_splits`, into one folder.

        Args:
            model: the network to evaluate (its weights come from `ckpt_path`).
            datamodule: the data.
            ckpt_path: the checkpoint to evaluate, e.g. a fit's checkpoints/best.ckpt (required).
            predict_splits: splits to write predictions_<split>.csv for besides test's, e.g. [train]. Flip
                test-time augmentation (when the model uses it) applies to the test split only: the other splits'
                predictions show what the network learned, not its best test-time answer.
        """
        self.test(model, datamodule=datamodule, ckpt_path=ckpt_path)
        flip = model.hparams.test_time_flip
        for split in dict.fromkeys(s for s in predict_splits or [] if s != "test"):
            datamodule.hparams.predict_split = split
            model.hparams.test_time_flip = False  # flip TTA is for the test split only
            self.predict(model, datamodule=datamodule, ckpt_path=ckpt_path)
        model.hparams.test_time_flip = flip
