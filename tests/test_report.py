"""The comparison report built from a finished (tiny) pipeline run."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_fake_run

from fmnist_pl.cli import main
from fmnist_pl.networks import NETWORKS
from fmnist_pl.report import STUDY, _verdict, build_report, confusion_from_predictions, most_confused, per_class_scores
from fmnist_pl.settings import PipelineSettings


@pytest.fixture(scope="module")
def finished_run(pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real pipeline run on tiny data, shared by the report tests."""
    from conftest import write_idx_dir

    root = tmp_path_factory.mktemp("report")
    data = write_idx_dir(root / "data")
    settings = PipelineSettings(data_dir=str(data), require_official=False, val_size=100, epochs=2,
                                accelerator="cpu", output_dir=str(root / "outputs"))  # fmt: skip
    return Path(pipeline.full_pipeline(settings))


@pytest.mark.integration
def test_report_has_every_section_and_image(finished_run: Path) -> None:
    report = (finished_run / "report.md").read_text()
    for heading in ("## Comparison", *(f"## {n}" for n in NETWORKS), "## The study's test confusion matrices",
                    "## Training images", "## Provenance"):  # fmt: skip
        assert heading in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    expected = {f"figures/{n}_{kind}.png" for n in NETWORKS
                for kind in ("curves", "confusion_test", "confusion_train", "mistakes")} | {"figures/samples.png"}  # fmt: skip
    assert set(images) == expected
    assert all((finished_run / image).stat().st_size > 5_000 for image in images)  # real plots, not empty files
    for network in NETWORKS:
        for table in ("confusion_matrix_test", "confusion_matrix_train", "per_class_test"):
            assert (finished_run / "tables" / f"{network}_{table}.csv").is_file()
    assert "88.90%" in report and "89.35%" in report  # the study's reference rows


@pytest.mark.integration
def test_report_numbers_match_the_metrics_files(finished_run: Path) -> None:
    summary = json.loads((finished_run / "summary.json").read_text())
    report = (finished_run / "report.md").read_text()
    for network in NETWORKS:
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


@pytest.mark.integration
def test_html_report_is_self_contained(finished_run: Path) -> None:
    page = (finished_run / "report.html").read_text()
    sources = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert (
        page.count("<img") == len(re.findall(r"!\[", (finished_run / "report.md").read_text())) == 4 * len(NETWORKS) + 1
    )


@pytest.mark.integration
def test_report_regenerates_from_a_finished_run_without_retraining(finished_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"  # the whole outputs folder, moved elsewhere: its relative links still resolve
    shutil.copytree(finished_run.parent, moved, symlinks=True)
    copy = moved / finished_run.name
    assert not os.path.isabs(os.readlink(copy / "cnn" / "train"))
    for name in ("report.md", "report.html", "summary.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    main(["report", str(copy)])
    assert "## Comparison" in (copy / "report.md").read_text()
    fresh = json.loads((copy / "summary.json").read_text())["networks"]
    original = json.loads((finished_run / "summary.json").read_text())["networks"]
    for network in fresh:
        assert fresh[network]["test_accuracy"] == original[network]["test_accuracy"]
    assert len(list((copy / "figures").glob("*.png"))) == 4 * len(NETWORKS) + 1


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


def test_report_from_files_alone_covers_every_network(tmp_path: Path) -> None:
    run = write_fake_run(tmp_path, {"dense": 0.88, "cnn": 0.9, "bn_cnn": 0.95})
    summary = build_report(run)
    report = (run / "report.md").read_text()
    assert [line for line in report.splitlines() if line.startswith("## ")][1:4] == ["## dense", "## cnn", "## bn_cnn"]
    for network in ("dense", "cnn", "bn_cnn"):
        metrics = json.loads((run / network / "evaluate" / "test" / "test_metrics.json").read_text())
        assert summary["networks"][network]["test_accuracy"] == metrics["accuracy"]
        assert summary["networks"][network]["flops_per_image"] == metrics["flops_per_image"]  # read, not recomputed
    assert "with flip test-time augmentation" in report.split("## bn_cnn")[1].split("##")[0]
    assert "with flip test-time augmentation" not in report.split("## cnn")[1].split("##")[0]
    assert "seed-spec" not in report and '"Neural Networks", Hoyt Thomas, 2020-03-12' in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == 13 and all((run / image).stat().st_size > 5_000 for image in images)


def _results(**accuracies: float) -> dict:
    return {n: {"test_accuracy": a, "test_images": 10_000, "training_wall_seconds": 10.0 + i,
                "flops_per_image": 10**6, "trainable_parameters": 1000} for i, (n, a) in enumerate(accuracies.items())}  # fmt: skip


def test_verdict_names_a_winner_only_beyond_the_noise_and_judges_the_90_percent_goal() -> None:
    tie = _verdict(_results(dense=0.8810, cnn=0.8807))
    assert "about as accurate" in tie and "most accurate" not in tie
    assert "No network reaches the study's goal of 90%" in tie
    clear = _verdict(_results(dense=0.8810, cnn=0.8935, bn_cnn=0.9410))
    assert "**bn_cnn** is the most accurate: 94.10%, against 89.35% for cnn" in clear
    assert "goal of 90% test accuracy is reached by **bn_cnn**" in clear
    assert "**dense** took the least time to train" in clear


def test_prefect_artifact_markdown_embeds_every_figure_and_names_the_run_folder(tmp_path: Path) -> None:
    import base64
    import io

    from PIL import Image

    from fmnist_pl.report import markdown_with_embedded_figures

    run = write_fake_run(tmp_path, {"dense": 0.88, "bn_cnn": 0.95})
    build_report(run)
    markdown = markdown_with_embedded_figures(run)
    assert "](figures/" not in markdown  # the Prefect UI cannot see the run folder: no relative links
    images = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([^)]+)\)", markdown)
    assert len(images) == len(re.findall(r"!\[", (run / "report.md").read_text())) == 9
    for data in images:
        width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert 0 < max(width, height) <= 800
    assert f"Run folder: `{run.resolve()}`" in markdown
