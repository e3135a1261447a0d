"""From a checkpoint to a model people use: TensorBoard curves of a fit, `fmnist-pl export` (ONNX, checked against
PyTorch, with model.json and a model card whose code gives `predict`'s answers)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from browser import chromium, dom_of
from conftest import N_TEST, free_port, tiny_args

from fmnist_pl import layout
from fmnist_pl.cli import main
from fmnist_pl.export import ExportError, check_parity
from fmnist_pl.fashion_mnist import read_idx
from fmnist_pl.networks import NETWORKS


@pytest.fixture(scope="module")
def fitted(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each registered network's first-seed fit of the shared pipeline run (its packaged fast config, 2 epochs on the
    tiny data), copied into `<root>/runs/<network>` beside the tiny data in `<root>/fmnist`: {network: run folder}.
    Copies, so that the exports these tests write never touch the shared run's files."""
    import shutil

    from conftest import write_idx_dir

    root = tmp_path_factory.mktemp("export")
    write_idx_dir(root / "fmnist")
    runs = {}
    for network in NETWORKS:
        runs[network] = root / "runs" / network
        shutil.copytree(layout.RunFolder(tiny_run).training(network, 0).path, runs[network])
    return runs


def data_of(run: Path) -> Path:
    return run.parent.parent / "fmnist"


def export(run: Path, *extra: str) -> Path:
    main(
        [
            "export",
            f"--ckpt_path={run / layout.BEST_CHECKPOINT}",
            f"--data.data_dir={data_of(run)}",
            "--data.require_official=false",
            *extra,
        ]
    )
    return run / layout.EXPORT_DIR


def card_code(card: str) -> str:
    """The card's ONNX Runtime lines."""
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


@pytest.mark.integration
@pytest.mark.parametrize("network", list(NETWORKS))
def test_export_matches_pytorch_and_its_card_code_gives_predicts_answers(
    network: str, fitted: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = fitted[network]
    exported = export(run)
    assert f"exported {network} to {exported / layout.ONNX_MODEL}" in capsys.readouterr().out
    model = json.loads((exported / layout.MODEL_DESCRIPTION).read_text())
    assert model["network"] == network and model["test_images"] == N_TEST and len(model["class_names"]) == 10
    assert model["parity"]["largest_probability_difference"] <= 1e-4
    assert model["test_time_flip"] == NETWORKS[network].__name__.startswith("BatchNorm")  # as its config says
    assert model["input"]["shape"] == ["batch", 28, 28] and model["input"]["dtype"] == "float32"
    low, high = model["test_accuracy_95"]
    assert low <= model["test_accuracy"] <= high and low < high

    # What `test` scores (fp32, as the export) is what the export says it scores.
    main(
        [
            "test",
            f"--ckpt_path={run / layout.BEST_CHECKPOINT}",
            "--trainer.precision=32-true",
            *tiny_args(data_of(run), tmp_path, "--trainer.logger.init_args.version=test"),
        ]
    )
    tested = json.loads((tmp_path / "runs" / "test" / layout.TEST_METRICS).read_text())
    assert model["test_accuracy"] == pytest.approx(tested["accuracy"])

    # The card's five lines, run as a user would beside model.onnx, on the test images, give predict's classes.
    card = (exported / layout.MODEL_CARD).read_text()
    for heading in ("## What it is", "## How well it does", "## The input it expects", "## Where it fails"):
        assert heading in card
    assert f"{model['test_accuracy']:.2%}".replace("%", " %") in card and "MIT" in card
    code = card_code(card)
    assert len(code.strip().splitlines()) == 5
    images = read_idx(data_of(run) / "t10k-images-idx3-ubyte.gz", "images").astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    user_code = re.sub(r"^images = .*$", f"images = np.load({str(tmp_path / 'images.npy')!r})", code, flags=re.M)
    printed = subprocess.run(
        [sys.executable, "-c", user_code], cwd=exported, capture_output=True, text=True, check=True
    )
    onnx_classes = [int(c) for c in re.findall(r"\d+", printed.stdout)]
    main(
        [
            "predict",
            f"--ckpt_path={run / layout.BEST_CHECKPOINT}",
            "--trainer.precision=32-true",
            *tiny_args(data_of(run), tmp_path, "--trainer.logger.init_args.version=predict"),
        ]
    )
    predicted = pd.read_csv(tmp_path / "runs" / "predict" / layout.PREDICTIONS)["predicted"].tolist()
    assert onnx_classes == predicted


@pytest.mark.integration
def test_an_export_that_disagrees_with_pytorch_is_refused_in_one_line(
    fitted: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from fmnist_pl import export as export_module

    real = export_module.onnx_probabilities

    def off_by_a_little(path: Path, pixels: np.ndarray, batch_size: int = 1_000) -> np.ndarray:
        probabilities = real(path, pixels, batch_size)
        probabilities[3] = np.roll(probabilities[3], 1)  # one image gets another class
        probabilities[5] += 3e-4
        return probabilities

    monkeypatch.setattr(export_module, "onnx_probabilities", off_by_a_little)
    run = fitted["dense"]
    for leftover in (run / layout.EXPORT_DIR).glob("*"):
        leftover.unlink()
    with pytest.raises(SystemExit) as stopped:
        export(run)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "1 of 101 test images get another class" in err[0] and "the export was not written" in err[0]
    )
    assert not (run / layout.EXPORT_DIR / layout.ONNX_MODEL).exists()


def test_parity_check_counts_other_classes_and_the_largest_difference() -> None:
    expected = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]], dtype=np.float32)
    assert check_parity(expected, expected + 5e-5) == pytest.approx(5e-5, rel=1e-3)
    with pytest.raises(
        ExportError, match=r"0 of 3 test images get another class, largest probability difference 2\.00e-04"
    ):
        check_parity(expected, expected + 2e-4)
    with pytest.raises(ExportError, match=r"1 of 3 test images get another class"):
        check_parity(expected, expected[[0, 0, 2]])


def test_export_of_a_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["export", f"--ckpt_path={tmp_path / 'none.ckpt'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fmnist-pl: error: checkpoint {tmp_path / 'none.ckpt'} does not exist; pass a .ckpt file written by `fmnist-pl fit`"
    ]


@pytest.mark.integration
def test_a_fit_writes_tensorboard_curves_and_hparams_beside_its_csv(fitted: dict[str, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = fitted["cnn"]
    events = EventAccumulator(str(run)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "hp/best_val_acc", "hp/val_acc"} <= scalars
    assert [e.step for e in events.Scalars("val/acc")] == sorted({e.step for e in events.Scalars("val/acc")})
    assert len(events.Scalars("val/acc")) == 2  # one point per epoch
    best = max(e.value for e in events.Scalars("val/acc"))
    assert events.Scalars("hp/best_val_acc")[-1].value == pytest.approx(best)
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HParams tab's record
    assert (run / layout.HISTORY).is_file()


@pytest.mark.integration
@pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)")
def test_tensorboard_lists_the_runs_and_draws_a_scalar_chart_in_chromium(fitted: dict[str, Path]) -> None:
    runs = fitted["cnn"].parent
    port = free_port()
    tensorboard = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={runs}", "--host=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                listed = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2).read())
                if listed:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "TensorBoard did not answer within 60 s"
            time.sleep(0.5)
        assert sorted(listed) == sorted(NETWORKS)  # each fit once, named by its run folder
        page = dom_of(f"http://127.0.0.1:{port}/#timeseries")
        assert all(name in page for name in NETWORKS)
        assert "<scalar-card" in page and "<line-chart" in page
    finally:
        tensorboard.terminate()
        tensorboard.wait(timeout=30)


@pytest.mark.integration
def test_a_network_the_exporter_cannot_translate_is_one_line(
    fitted: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import torch

    def cannot(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Unsupported operator aten::made_up\nwith a long explanation")

    monkeypatch.setattr(torch.onnx, "export", cannot)
    run = fitted["cnn"]
    with pytest.raises(SystemExit):
        export(run, f"--output_dir={run / 'unexportable'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "fmnist-pl: error: torch could not export the 'cnn' network to ONNX "
        "(RuntimeError: Unsupported operator aten::made_up); nothing was written"
    ]
    assert not (run / "unexportable" / layout.ONNX_MODEL).exists()
