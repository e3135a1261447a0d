"""What a sweep writes into outputs/sweeps/<study>/: trials.csv, Optuna's figures, best.yaml (a config `fmnist-pl fit
--config` takes as it is) and a report, Markdown and HTML, also published as a Prefect artifact."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from fmnist_pl.io import atomic_write, write_text_atomic
from fmnist_pl.report.render import Figure, Section, Table, markdown_with_embedded_figures, render_html, render_markdown

# Each figure's file (in figures/), the optuna.visualization.matplotlib function that draws it, and its caption.
FIGURES = {
    "optimization_history": ("plot_optimization_history", "Each trial's best validation accuracy, and the best so far"),
    "parallel_coordinates": ("plot_parallel_coordinate", "Every finished trial's options and its validation accuracy"),
    "parameter_importances": ("plot_param_importances", "How much each option explains the validation accuracy"),
}


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: its number, options, value (best validation accuracy), state, epochs run and seconds."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        rows.append(
            {
                "number": trial.number,
                **{f"params.{name}": value for name, value in sorted(trial.params.items())},
                "value": trial.value
                if trial.state == TrialState.COMPLETE
                else max(trial.intermediate_values.values(), default=None),
                "state": trial.state.name.lower(),
                "epochs": trial.user_attrs.get("epochs"),
                "seconds": trial.user_attrs.get("seconds"),
                "reused": trial.user_attrs.get("cached"),
                "retry_of": trial.user_attrs.get("retry_of"),
            }
        )
    return pd.DataFrame(rows)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The complete trial with the best validation accuracy; among equals (as many images right), the one that
    trained the fewest epochs, the cheaper recipe, then the first. Optuna's `best_trial` takes the first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return study.best_trial  # Optuna's own one-line error: no trial is complete yet
    top = max(trial.value for trial in complete)
    return min(
        (trial for trial in complete if trial.value == top),
        key=lambda trial: (trial.user_attrs.get("epochs") or float("inf"), trial.number),
    )


def best_config(study: optuna.Study, base_config: Path) -> dict:
    """The network's config with the best trial's options set in it: what `fmnist-pl fit --config` takes."""
    config = yaml.safe_load(base_config.read_text())
    for option, value in best_trial(study).params.items():
        *parents, leaf = option.split(".")
        section = config
        for name in parents:
            section = section.setdefault(name, {})
        section[leaf] = value
    return config


def draw_figures(study: optuna.Study, folder: Path) -> list[Figure]:
    """Optuna's matplotlib figures of the study, those it can draw (importances need two finished trials)."""
    import matplotlib

    matplotlib.use("Agg")  # optuna draws with pyplot; no display here
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    figures = []
    for name, (function, caption) in FIGURES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" warnings of optuna's matplotlib backend
                axes = getattr(optuna_plots, function)(study, target_name="validation accuracy")
        except (ValueError, RuntimeError):  # too few finished trials for this figure
            continue
        figure = axes.ravel()[0].figure if hasattr(axes, "ravel") else axes.figure
        path = folder / "figures" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.set_size_inches(10, 5.5)
        figure.tight_layout()
        with atomic_write(path) as tmp:
            figure.savefig(tmp, dpi=110, format="png")
        plt.close(figure)
        figures.append(Figure(f"figures/{name}.png", caption))
    return figures


def write_best_config(study: optuna.Study, settings: object, folder: Path) -> Path:
    """best.yaml: the network's config with the best trial's options set in it."""
    best = best_trial(study)
    base = settings.pipeline().config_file(settings.network)
    header = (
        f"# The best trial ({best.number}, validation accuracy {best.value:.4f}) of study {study.study_name!r}: "
        f"{base.name} with its options set.\n# fmnist-pl fit --config best.yaml\n"
    )
    path = folder / "best.yaml"
    write_text_atomic(path, header + yaml.safe_dump(best_config(study, base), sort_keys=False))
    return path


def confirmation_section(confirmation: dict) -> Section:
    """The confirmation on the test set: accuracies per seed, the paired tests and the verdict."""
    comparison = confirmation["comparison"]
    rows = [
        [
            str(seed),
            f"{best:.2%}",
            f"{default:.2%}",
            f"{m['only_first_correct']}/{m['only_second_correct']}",
            f"{m['p_value']:.3g}",
        ]
        for seed, best, default, m in zip(
            confirmation["seeds"],
            confirmation["test_accuracy"]["best"],
            confirmation["test_accuracy"]["default"],
            comparison["mcnemar"],
            strict=True,
        )
    ]
    means = {name: float(np.mean(values)) for name, values in confirmation["test_accuracy"].items()}
    return Section(
        "Confirmation on the test set",
        [
            f"best.yaml and the default config, each trained on seeds {confirmation['seeds']} and evaluated on the "
            f"test set: mean test accuracy {means['best']:.2%} against {means['default']:.2%}.",
            f"Difference (best minus default) {comparison['difference']:+.2%}, {comparison['confidence']:.0%} "
            f"bootstrap interval [{comparison['ci_low']:+.2%}, {comparison['ci_high']:+.2%}]: "
            f"**{confirmation['verdict']}**.",
        ],
        tables=[Table(["seed", "best", "default", "only best / only default right", "McNemar p"], rows)],
    )


def write_sweep_outputs(study: optuna.Study, settings: object, folder: Path, confirmation: dict | None = None) -> dict:
    """trials.csv, the figures and report.md/.html in `folder` (best.yaml is written before the confirmation), the
    report as a Prefect artifact; the best trial's number and value."""
    table = trials_table(study)
    with atomic_write(folder / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    best = best_trial(study)
    figures = draw_figures(study, folder)
    counts = table["state"].value_counts().to_dict()
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    # The report's table is for reading: options to 4 significant digits, named as `fit` names them (trials.csv
    # keeps every digit, for repeating a trial).
    shown = table.copy()
    shown["value"] = shown["value"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
    for column in [c for c in shown.columns if c.startswith("params.") and shown[c].dtype.kind == "f"]:
        shown[column] = shown[column].map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
    shown = shown.astype(object).where(shown.notna(), "").rename(columns=lambda c: c.removeprefix("params."))
    sections = [
        Section(
            "Study",
            [
                f"Network **{settings.network}**, {len(table)} trials ({states}); storage "
                f"{settings.storage_url(hide_password=True)}; search space {settings.space_file()}.",
                f"Best: trial **{best.number}**, validation accuracy **{best.value:.4f}**. The validation split chose "
                "it; the test set was not looked at.",
            ],
            code=yaml.safe_dump(best.params, sort_keys=True).strip(),
        ),
        Section("Trials", tables=[Table.of(shown)]),
        Section("Figures", figures=figures),
    ]
    if confirmation:
        write_text_atomic(folder / "confirmation.json", json.dumps(confirmation, indent=2) + "\n")
        sections.insert(1, confirmation_section(confirmation))
    title = f"fmnist-pl sweep: {study.study_name}"
    write_text_atomic(folder / "report.md", render_markdown(title, sections, folder))
    write_text_atomic(folder / "report.html", render_html(title, [], sections, folder))
    from prefect.artifacts import create_markdown_artifact

    key = "sweep-" + "".join(c if c.isalnum() else "-" for c in study.study_name.lower())
    create_markdown_artifact(markdown=markdown_with_embedded_figures(folder), key=key, description=title)
    return {"number": best.number, "value": best.value}
