"""Errors a user can act on. The CLI prints them without a traceback and exits with `exit_code`."""

from __future__ import annotations

import errno
import os
import re

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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C would be (commands/__init__.py) so that cleanup runs; unlike Ctrl-C,
    nothing catches it to carry on (chat's Ctrl-C stops one answer, SIGTERM stops the chat)."""


class Interrupted(QLoraError):
    """Ctrl-C or SIGTERM stopped a command; the message says what was (not) left behind."""

    exit_code = 130


_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust (safetensors) prints an errno
_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def write_failure(exc: BaseException) -> tuple[str, bool] | None:
    """(what a failed write says in plain words, whether it is a full disk or size limit), when `exc`
    is one: an OSError, safetensors' "os error N", or torch's PytorchStreamWriter failure (no errno)."""
    seen = exc
    while seen is not None:
        text = str(seen)
        if isinstance(seen, OSError) and seen.errno:
            where = f" ({seen.filename})" if seen.filename else ""
            return f"{seen.strerror or os.strerror(seen.errno)}{where}", seen.errno in _FULL
        found = _OS_ERROR.search(text)
        if found:
            code = int(found.group(1))
            return os.strerror(code), code in _FULL
        if "PytorchStreamWriter" in text or ("inline_container.cc" in text and "Reader" not in text):  # torch's zip writer
            return "a file write failed (the disk is full, or a file size limit was reached)", True
        seen = seen.__cause__ or seen.__context__
    return None
