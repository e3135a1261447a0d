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
from fmnist_pl.report import build_report
from fmnist_pl.report.build import summarize
from fmnist_pl.report.collect import collect_run
from fmnist_pl.report.figures import figure_files
from fmnist_pl.report.statistics import (
    confusion_from_predictions,
    mcnemar_p_value,
    most_confused,
    paired_comparison,
    per_class_scores,
)
from fmnist_pl.report.study import STUDY


@pytest.fixture
def finished_run(tiny_run: Path) -> Path:
    """The suite's shared real pipeline run on tiny data (conftest.tiny_run); these tests only read it."""
    return tiny_run


@pytest.mark.integration
def test_report_has_every_section_and_image(finished_run: Path) -> None:
    report = (finished_run / "report.md").read_text()
    for heading in (
        "## Comparison",
        *(f"## {n}" for n in NETWORKS),
        "## The study's test confusion matrices",
        "## Training images",
        "## Provenance",
    ):
        assert heading in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert sorted(images) == sorted(figure_files(list(NETWORKS)))
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
        metrics = json.loads((finished_run / network / "seed-0" / "evaluate" / "test_metrics.json").read_text())
        history = pd.read_csv(finished_run / network / "seed-0" / "train" / "history.csv")
        result = summary["networks"][network]["seeds"]["0"]
        assert result["test_accuracy"] == metrics["accuracy"] and result["test_loss"] == metrics["loss"]
        assert result["best_val_accuracy"] == history["val/acc"].max()
        assert result["best_val_epoch"] == int(history["val/acc"].idxmax()) + 1
        assert summary["networks"][network]["trainable_parameters"] == metrics["trainable_parameters"]
        assert f"{metrics['accuracy']:.2%}" in report
        train_matrix = pd.read_csv(finished_run / "tables" / f"{network}_confusion_matrix_train.csv", index_col=0)
        predictions = pd.read_csv(finished_run / network / "seed-0" / "evaluate" / "predictions_train.csv")
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
        page.count("<img")
        == len(re.findall(r"!\[", (finished_run / "report.md").read_text()))
        == len(figure_files(list(NETWORKS)))
    )


@pytest.mark.integration
def test_report_regenerates_from_a_finished_run_without_retraining(finished_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"  # the whole outputs folder, moved elsewhere: its relative links still resolve
    shutil.copytree(finished_run.parent, moved, symlinks=True)
    copy = moved / finished_run.name
    assert not os.path.isabs(os.readlink(copy / "cnn" / "seed-0" / "train"))
    for name in ("report.md", "report.html", "summary.json"):
        (copy / name).unlink()
    shutil.rmtree(copy / "figures")
    main(["report", str(copy)])
    assert "## Comparison" in (copy / "report.md").read_text()
    fresh = json.loads((copy / "summary.json").read_text())["networks"]
    original = json.loads((finished_run / "summary.json").read_text())["networks"]
    for network in fresh:
        assert fresh[network]["test_accuracy"] == original[network]["test_accuracy"]
    assert len(list((copy / "figures").glob("*.png"))) == len(figure_files(list(NETWORKS)))


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


@pytest.mark.integration  # renders every figure: about 10 s
def test_report_from_files_alone_covers_every_network_and_seed(tmp_path: Path) -> None:
    run = write_fake_run(tmp_path, {"dense": 0.88, "cnn": 0.9, "bn_cnn": 0.95}, seeds=(0, 1, 2))
    summary = build_report(run)
    report = (run / "report.md").read_text()
    assert [line for line in report.splitlines() if line.startswith("## ")][1:4] == ["## dense", "## cnn", "## bn_cnn"]
    for network in ("dense", "cnn", "bn_cnn"):
        accuracies = [
            json.loads((run / network / f"seed-{seed}" / "evaluate" / "test_metrics.json").read_text())["accuracy"]
            for seed in (0, 1, 2)
        ]
        result = summary["networks"][network]
        assert [result["seeds"][str(s)]["test_accuracy"] for s in (0, 1, 2)] == accuracies  # read, not recomputed
        assert result["test_accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
        assert result["test_accuracy"]["std"] == pytest.approx(np.std(accuracies, ddof=1))
        assert (result["test_accuracy"]["min"], result["test_accuracy"]["max"]) == (min(accuracies), max(accuracies))
        assert f"{np.mean(accuracies):.2%} ± {np.std(accuracies, ddof=1) * 100:.2f}" in report
    assert {(c["first"], c["second"]) for c in summary["comparisons"]} == {
        ("dense", "cnn"),
        ("dense", "bn_cnn"),
        ("cnn", "bn_cnn"),
    }
    assert all(len(c["mcnemar"]) == 3 for c in summary["comparisons"]) and "McNemar per seed" in report
    assert "with flip test-time augmentation" in report.split("## bn_cnn")[1].split("##")[0]
    assert "with flip test-time augmentation" not in report.split("## cnn")[1].split("##")[0]
    assert "seed-spec" not in report and '"Neural Networks", Hoyt Thomas, 2020-03-12' in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) == len(figure_files(["dense", "cnn", "bn_cnn"])) and all(
        (run / image).stat().st_size > 5_000 for image in images
    )
    page = (run / "report.html").read_text()
    assert page.count('class="card"') == 3 and "90 % goal reached" in page and "90 % goal not reached" in page
    assert "@media print" in page and "<th></th>" not in page.split("<h2>dense</h2>")[0]  # no pandas index column


def correct_answers(accuracy: float, images: int = 10_000, seed: int = 0) -> np.ndarray:
    """Which of `images` test images a classifier of that accuracy gets right (a random draw)."""
    return np.random.default_rng(seed).random(images) < accuracy


def test_mcnemar_exact_p_values() -> None:
    assert mcnemar_p_value(0, 0) == 1.0
    assert mcnemar_p_value(5, 5) == 1.0
    assert mcnemar_p_value(0, 6) == pytest.approx(2 / 64)  # all six discordant images favour one side
    assert mcnemar_p_value(10, 30) == pytest.approx(0.00222, abs=1e-5)  # binomial(40, 1/2) tail, doubled
    assert mcnemar_p_value(3000, 2000) < 1e-40  # large counts stay exact, no float overflow


def test_paired_comparison_tie_not_significant_and_significant() -> None:
    seeds = [0, 1, 2]
    same = np.stack([correct_answers(0.9, seed=s) for s in seeds])
    tie = paired_comparison(same, same.copy(), seeds)
    assert tie["difference"] == 0 and not tie["significant"] and tie["ci_low"] == tie["ci_high"] == 0

    close = paired_comparison(same, np.stack([correct_answers(0.9, seed=10 + s) for s in seeds]), seeds)
    assert not close["significant"] and close["ci_low"] < 0 < close["ci_high"]  # equally good: no winner

    better = np.stack([correct_answers(0.94, seed=20 + s) for s in seeds])
    clear = paired_comparison(better, same, seeds)
    assert clear["significant"] and 0 < clear["ci_low"] < clear["difference"] < clear["ci_high"]
    assert all(m["p_value"] < 0.05 and m["only_first_correct"] > m["only_second_correct"] for m in clear["mcnemar"])
    reverse = paired_comparison(same, better, seeds)
    assert reverse["significant"] and reverse["difference"] == pytest.approx(-clear["difference"])

    mixed = better.copy()
    mixed[2] = same[2]  # one seed where they agree exactly: not every seed's test is significant
    assert not paired_comparison(mixed, same, seeds)["significant"]


def test_verdict_names_a_winner_only_when_the_test_says_so(tmp_path: Path) -> None:
    # The verdict from the run's files alone (summarize: what build_report writes, without the figures).
    clear = summarize(collect_run(write_fake_run(tmp_path / "a", {"dense": 0.5, "cnn": 0.5, "bn_cnn": 0.97}, (0, 1))))
    verdict = clear["verdict"]
    assert verdict.startswith("**bn_cnn** is the most accurate network, significantly ahead of every other.")
    assert "**bn_cnn** beats dense" in verdict and "**bn_cnn** beats cnn" in verdict
    assert "no detectable difference" in verdict.split("beats cnn")[1]  # dense against cnn: same accuracy
    assert "goal of 90% test accuracy is reached by **bn_cnn**" in verdict
    tie = summarize(collect_run(write_fake_run(tmp_path / "b", {"dense": 0.6, "cnn": 0.6})))["verdict"]
    assert tie.startswith("No network is significantly more accurate") and "beats" not in tie
    assert "No network reaches the study's goal of 90%" in tie


@pytest.mark.integration  # renders every figure: about 8 s
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
    assert (
        len(images)
        == len(re.findall(r"!\[", (run / "report.md").read_text()))
        == len(figure_files(["dense", "bn_cnn"]))
    )
    for data in images:
        width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert 0 < max(width, height) <= 800
    assert f"Run folder: `{run.resolve()}`" in markdown


@pytest.mark.parametrize("epochs", [1, 2, 30])
def test_epoch_axes_show_whole_epochs_even_for_a_one_epoch_run(epochs: int) -> None:
    from matplotlib.figure import Figure

    from fmnist_pl.report.figures import epoch_axis

    ax = Figure().subplots()
    ax.plot(range(1, epochs + 1), [0.9] * epochs, "o-")  # one point alone used to get ticks 0.96, 0.98, ...
    epoch_axis(ax, epochs)
    shown = [tick for tick in ax.get_xticks() if 0.5 <= tick <= epochs + 0.5]
    assert shown and all(float(tick).is_integer() for tick in shown)
