"""The 2020 study this project rebuilds ("Neural Networks", Hoyt Thomas, 2020-03-12): its published figures."""

from __future__ import annotations

import json
from pathlib import Path

STUDY = json.loads((Path(__file__).parents[1] / "reference_study.json").read_text())
STUDY_CITATION = '"Neural Networks", Hoyt Thomas, 2020-03-12'
STUDY_GOAL = 0.90  # the study's own target test accuracy, which neither of its networks reached
