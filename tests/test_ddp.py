"""Multi-process DDP on CPU: training runs, and evaluation counts every test image exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import N_TEST, tiny_args

pytestmark = pytest.mark.integration  # real fits, a Prefect server, subprocesses


def cli(*args: str) -> None:
    """Run `python -m fmnist_pl` in a subprocess: Lightning's DDP launcher re-runs that command for each rank."""
    result = subprocess.run([sys.executable, "-m", "fmnist_pl", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ddp_fit_on_2_processes_and_exact_test_counts_on_1_and_3(tiny_data: Path, tmp_path: Path) -> None:
    cli(
        "fit",
        *tiny_args(tiny_data, tmp_path, "--trainer.logger.init_args.version=fit"),
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=2",
        "--model.network=cnn",
    )
    checkpoint = tmp_path / "runs" / "fit" / "checkpoints" / "best.ckpt"
    assert checkpoint.is_file()
    from fmnist_pl.cli import main

    accuracies = []
    for devices in (1, 3):  # 3 ranks over 101 images: no rank count divides it (2 ranks: tests/test_scaleout.py)
        test = ["test", *tiny_args(tiny_data, tmp_path, f"--trainer.logger.init_args.version=test{devices}")]
        test += [f"--trainer.devices={devices}", f"--ckpt_path={checkpoint}"]
        if devices == 1:
            main(test)  # one process: in this one
        else:
            cli(*test, "--trainer.strategy=ddp")
        result = json.loads((tmp_path / "runs" / f"test{devices}" / "test_metrics.json").read_text())
        assert result["devices"] == devices
        assert result["images"] == N_TEST  # a DistributedSampler would have padded 101 to 102
        accuracies.append(result["accuracy"])
    assert accuracies[1] == pytest.approx(accuracies[0], abs=1e-12)
