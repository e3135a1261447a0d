"""The comparison report of a pipeline run, one job per file: collect.py reads the run's files, statistics.py
compares the networks, figures.py draws, build.py writes the sections, render.py turns them into report.md and
report.html through the jinja2 templates in templates/."""

from __future__ import annotations

import argparse
from pathlib import Path

from fmnist_pl.report.build import build_report
from fmnist_pl.report.render import markdown_with_embedded_figures

__all__ = ["build_report", "markdown_with_embedded_figures", "report_main"]


def report_main(argv: list[str]) -> None:
    """`fmnist-pl report RUN_DIR`: rebuild a finished run's report without retraining."""
    parser = argparse.ArgumentParser(prog="fmnist-pl report", description=report_main.__doc__)
    parser.add_argument("run_dir", type=Path, help="a pipeline run folder, e.g. outputs/latest")
    args = parser.parse_args(argv)
    build_report(args.run_dir)
    print(
        f"report written: {args.run_dir / 'report.md'}, {args.run_dir / 'report.html'}, {args.run_dir / 'summary.json'}"
    )
