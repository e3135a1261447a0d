"""The report as a browser shows it: every image of report.html and of the Prefect artifact decodes in Chromium."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from browser import chromium, image_counts
from conftest import write_fake_run

from fmnist_pl.report import build_report, markdown_with_embedded_figures

pytestmark = [
    pytest.mark.skipif(chromium() is None, reason="no Chromium here (Debian: apt-get install chromium)"),
    pytest.mark.integration,  # a real browser in a subprocess
]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = write_fake_run(tmp_path_factory.mktemp("browser"), {"dense": 0.88, "cnn": 0.9, "bn_cnn": 0.95}, seeds=(0, 1))
    build_report(run)
    return run


def test_every_image_of_report_html_decodes_in_chromium(report_run: Path) -> None:
    images, broken = image_counts(report_run / "report.html")
    assert (images, broken) == (15, 0)


def test_every_image_of_the_prefect_artifact_decodes_in_chromium(report_run: Path) -> None:
    sources = re.findall(r"!\[[^\]]*\]\((data:image/png;base64,[^)]+)\)", markdown_with_embedded_figures(report_run))
    page = report_run / "artifact_images.html"
    page.write_text("<html><body>" + "".join(f"<img src='{source}'>" for source in sources) + "</body></html>")
    assert image_counts(page) == (15, 0)


def test_the_check_sees_a_broken_image(tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text("<html><body><img src='figures/missing.png'></body></html>")
    assert image_counts(page) == (1, 1)
