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
