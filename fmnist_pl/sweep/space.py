"""Search spaces: packaged YAML files (`fmnist_pl/configs/search/<network>.yaml`) that map `fmnist-pl fit` options to
Optuna distributions, checked before any trial starts.

    model.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}   # a float, on a log scale
    trainer.max_epochs: {low: 3, high: 8}                          # an int (both bounds are ints)
    data.batch_size: [64, 128, 256]                                # one of these
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import yaml
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from fmnist_pl.configs import CONFIG_DIR
from fmnist_pl.errors import ConfigError

SEARCH_DIR = CONFIG_DIR / "search"
RANGE_KEYS = {"low", "high", "log", "step"}


def packaged_space(network: str) -> Path:
    """The packaged search space of `network`."""
    path = SEARCH_DIR / f"{network}.yaml"
    if not path.is_file():
        raise ConfigError(f"network {network!r} has no packaged search space; give one with --space FILE")
    return path


def load_space(path: Path) -> dict[str, BaseDistribution]:
    """The distributions of a search-space file, by `fit` option (without its leading --); ConfigError in one line
    for a file that is missing, not YAML, or holds a malformed distribution."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--space {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"--space {path}: expected a mapping of `fit` options to distributions, "
            "e.g. `model.learning_rate: {low: 1.0e-4, high: 1.0e-2, log: true}`"
        )
    return {str(option).removeprefix("--"): distribution(str(option), spec, path) for option, spec in raw.items()}


def distribution(option: str, spec: object, path: Path) -> BaseDistribution:
    """One option's distribution: a list of choices, or a range {low, high[, log][, step]} of ints or floats."""
    where = f"--space {path}: {option}"
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty list of choices")
        return CategoricalDistribution(spec)
    if not isinstance(spec, dict) or not {"low", "high"} <= spec.keys() or spec.keys() - RANGE_KEYS:
        raise ConfigError(f"{where}: expected a list of choices or {{low, high[, log][, step]}}, got {spec!r}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers) or not isinstance(log, bool):
        raise ConfigError(f"{where}: low, high and step must be numbers and log true or false, got {spec!r}")
    if not low < high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})")
    if log and (low <= 0 or step is not None):
        raise ConfigError(f"{where}: a log scale needs low > 0 and no step")
    try:
        if all(isinstance(v, int) for v in numbers):
            return IntDistribution(low, high, log=log, step=step or 1)
        return FloatDistribution(float(low), float(high), log=log, step=step)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def option_value(value: object) -> str:
    """A sampled value as `fit` reads it on its command line."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_against_fit(space: dict[str, BaseDistribution], config: Path, path: Path) -> None:
    """`fmnist-pl fit` takes every option of the space, at each end of its range (or every choice): checked by
    fit's own parser (`--print_config` parses and validates without training), in one line if it refuses."""
    from fmnist_pl.cli import main as cli_main  # Lightning loads only for a space that passed its own checks

    edges = []
    for option, dist in space.items():
        if isinstance(dist, CategoricalDistribution):
            edges += [(option, choice) for choice in dist.choices]
        else:
            edges += [(option, dist.low), (option, dist.high)]
    # One fit command per value at most, grouped into as few commands as the longest list of values needs.
    for index in range(max(sum(1 for o, _ in edges if o == option) for option in space)):
        values = {}
        for option in space:
            mine = [v for o, v in edges if o == option]
            values[option] = mine[min(index, len(mine) - 1)]
        argv = ["fit", f"--config={config}", "--print_config"]
        argv += [f"--{option}={option_value(value)}" for option, value in values.items()]
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
                cli_main(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                lines = printed.getvalue().splitlines()
                errors = [line.removeprefix("fmnist-pl: error: ") for line in lines if line.startswith("fmnist-pl:")]
                reason = errors[0] if errors else f"exit code {e.code}"
                raise ConfigError(f"--space {path}: `fmnist-pl fit` refuses it: {reason}") from None
