"""User-facing failures; the CLI and the pipeline print each as one line instead of a traceback."""

from __future__ import annotations

from collections.abc import Callable

import pydantic


class FmnistError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


class ConfigError(FmnistError, ValueError):
    """A bad option value (learning rate, val_size, checkpoint path, ...)."""


class DataError(FmnistError):
    """A missing, truncated, corrupt or wrong data file."""


class DownloadError(DataError):
    """The official download failed (no network, a mirror down): unlike the other errors, a retry may pass."""


class TrainingDiverged(FmnistError):
    """The loss became non-finite or exploded: the settings (a learning rate too high) need changing; a retry with
    the same settings diverges again."""


# Errors a user fixes (an option, a file, the machine), never a bug: one line, exit code 2, no retry. The pipeline's
# and the sweep's own processes meet these; Lightning's and jsonargparse's come from `fmnist-pl` (cli.main), which turns
# them into its own one line and exit code 2 before they could reach a flow.
USER_ERRORS = (FmnistError, pydantic.ValidationError)

SEED_RANGE = range(2**32)  # what numpy's and Lightning's seeding accept


def check_seed(seed: int) -> None:
    """Refuse a seed that numpy's seeding would reject only once training starts; raises ConfigError."""
    if seed not in SEED_RANGE:
        raise ConfigError(f"seed {seed} is out of range: a seed is a whole number from 0 to {SEED_RANGE[-1]:,}")


def one_line(error: BaseException, field_name: Callable[[tuple], str] = lambda loc: ".".join(map(str, loc))) -> str:
    """The one line the CLI and the pipeline print for an error a user fixes, built from the exception's data:
    a pydantic ValidationError as `<field>: <problem>` per problem (a validator's own words, without pydantic's
    "Value error, " prefix); an error that wraps its real problem (jsonargparse wraps it two or three deep) as its
    own first line and then its root cause's; anything else as its first line."""
    if isinstance(error, pydantic.ValidationError):
        problems = []
        for problem in error.errors(include_url=False):
            own = (problem.get("ctx") or {}).get("error")
            message = str(own) if problem["type"] == "value_error" and own else problem["msg"]
            given = f" (given {problem['input']!r})" if problem["type"] != "value_error" and "input" in problem else ""
            field = field_name(problem["loc"]) if problem["loc"] else ""  # a bare type (jsonargparse's) has none
            problems.append(f"{field}: {message}{given}" if field else f"{message}{given}")
        return "; ".join(problems)
    first = first_line(error)
    root = error
    while (cause := root.__cause__ or root.__context__) is not None:
        root = cause
    if root is error:
        return first
    detail = one_line(root) if isinstance(root, pydantic.ValidationError) else first_line(root)
    return first if detail in first else f"{first.rstrip(':')}: {detail}"


def first_line(error: BaseException) -> str:
    """An error's first non-blank line, stripped."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
