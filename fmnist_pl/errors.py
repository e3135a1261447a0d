"""User-facing failures; the CLI and the pipeline print each as one line instead of a traceback."""


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


SEED_RANGE = range(2**32)  # what numpy's and Lightning's seeding accept


def check_seed(seed: int) -> None:
    """Refuse a seed that numpy's seeding would reject only once training starts; raises ConfigError."""
    if seed not in SEED_RANGE:
        raise ConfigError(f"seed {seed} is out of range: a seed is a whole number from 0 to {SEED_RANGE[-1]:,}")
