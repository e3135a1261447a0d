"""The two kinds of user-facing failure; the CLI prints either as one line instead of a traceback."""


class FmnistError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do."""


class ConfigError(FmnistError, ValueError):
    """A bad option value (learning rate, val_size, checkpoint path, ...)."""


class DataError(FmnistError):
    """A missing, truncated, corrupt or wrong data file."""
