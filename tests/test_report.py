"""The comparison report built from a finished (tiny) pipeline run."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fmnist_pl.cli import main
from fmnist_pl.report import STUDY, confusion_from_predictions, most_confused, per_class_scores


@pytest.fixture(scope="module")
def finished_run(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real pipeline run on tiny data, shared by the report tests."""
    from conftest import write_idx_dir

    root = tmp_path_factory.mktemp("report")
    data = write_idx_dir(root / "data")
    return Path(pipeline.full_pipeline(data_dir=str(data), require_official=False, val_size=100, epochs=2,
                                       accelerator="cpu", output_dir=str(root / "outputs")))  # fmt: skip


def test_report_has_every_section_and_image(finished_run: Path) -> None:
    report = (finished_run / "report.md").read_text()
    for heading in ("## Comparison", "## dense", "## cnn", "## The study's test confusion matrices", "## Training images",
                    "## Provenance"):  # fmt: skip
        assert heading in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    expected = {f"figures/{n}_{kind}.png" for n in ("dense", "cnn")
                for kind in ("curves", "confusion_test", "confusion_train", "mistakes")} | {"figures/samples.png"}  # fmt: skip
    assert set(images) == expected
    assert all((finished_run / image).stat().st_size > 5_000 for image in images)  # real plots, not empty files
    for network in ("dense", "cnn"):
        for table in ("confusion_matrix_test", "confusion_matrix_train", "per_class_test"):
            assert (finished_run / "tables" / f"{network}_{table}.csv").is_file()
    assert "88.90%" in report and "89.35%" in report  # the study's reference rows


def test_report_numbers_match_the_metrics_files(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    report = (finished_run / "report.md").read_text()
    for network in ("dense", "cnn"):
        metrics = json.loads((finished_run / network / "evaluate" / "test" / "test_metrics.json").read_text())
        history = pd.read_csv(finished_run / network / "train" / "history.csv")
        result = summary["networks"][network]
        assert result["test_accuracy"] == metrics["accuracy"] and result["test_loss"] == metrics["loss"]
        assert result["best_val_accuracy"] == history["val/acc"].max()
        assert result["best_val_epoch"] == int(history["val/acc"].idxmax()) + 1
        assert result["trainable_parameters"] == metrics["trainable_parameters"]
        assert f"{metrics['accuracy']:.2%}" in report
        train_matrix = pd.read_csv(finished_run / "tables" / f"{network}_confusion_matrix_train.csv", index_col=0)
        predictions = pd.read_csv(finished_run / network / "evaluate" / "predict_train" / "predictions.csv")
        assert train_matrix.to_numpy().sum() == len(predictions) == 540  # 640 training images less 100 validation
    assert (
        summary["provenance"]["data sha256"]
        == json.loads((finished_run / "run.json").read_text())["steps"]["download"]["sha256"]
    )
    assert "torch" in summary["provenance"]["packages"]


def test_html_report_is_self_contained(finished_run: Path) -> None:
    page = (finished_run / "report.html").read_text()
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert page.count("<img") == 9


def test_report_regenerates_from_a_finished_run_without_retraining(finished_run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    for name in ("report.md", "report.html", "summary.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    main(["report", str(copy)])
    assert "## Comparison" in (copy / "report.md").read_text()
    fresh = json.loads((copy / "summary.json").read_text())["networks"]
    original = json.loads((finished_run / "summary.json").read_text())["networks"]
    for network in fresh:
        assert fresh[network]["test_accuracy"] == original[network]["test_accuracy"]
    assert len(list((copy / "figures").glob("*.png"))) == 9


def test_report_on_an_unfinished_run_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    assert exit_.value.code == 2
    assert "run.json is missing" in capsys.readouterr().err


def test_scores_and_confusions_from_known_counts() -> None:
    matrix = np.array(STUDY["networks"]["dense"]["confusion_matrix_test"])
    scores = per_class_scores(matrix)
    assert scores.loc["Trouser", "recall"] == pytest.approx(979 / 1000)
    assert scores.loc["Shirt", "precision"] == pytest.approx(652 / matrix[:, 6].sum(), abs=1e-4)
    top = most_confused(matrix, top=1).iloc[0]
    assert (top["true"], top["predicted as"], top["images"]) == ("Shirt", "T-shirt/top", 141)
    predictions = pd.DataFrame({"label": [0, 0, 1, 9], "predicted": [0, 6, 1, 7]})
    counts = confusion_from_predictions(predictions)
    assert counts[0, 0] == 1 and counts[0, 6] == 1 and counts[9, 7] == 1 and counts.sum() == 4


def test_study_reference_figures_are_consistent() -> None:
    for figures in STUDY["networks"].values():
        matrix = np.array(figures["confusion_matrix_test"])
        assert matrix.sum() == 10_000 and (matrix.sum(axis=1) == 1_000).all()
        assert np.trace(matrix) / 10_000 == pytest.approx(figures["test_accuracy"])
