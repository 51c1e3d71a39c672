"""Errors a user can act on. The CLI prints them without a traceback and exits with `exit_code`."""

from __future__ import annotations

EXIT_BLOCKED = 1  # the input or the environment is not ready
EXIT_USAGE = 2  # the command line itself is wrong


class QLoraError(Exception):
    """An actionable failure: the message says what is wrong, where, and what to do."""

    exit_code = EXIT_BLOCKED


class ConfigError(QLoraError):
    pass


class DataError(QLoraError):
    pass


class PlatformError(QLoraError):
    pass


class UsageError(QLoraError):
    exit_code = EXIT_USAGE
