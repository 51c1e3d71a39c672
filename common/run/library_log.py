"""Library output during a run goes to the run folder's train.log, not the console.

Dataset map bars, model-loading bars, transformers / TRL deprecation warnings, hub retry lines and
mlx-lm's prints drown our own lines (and leave escape codes in a log file). While a run lasts,
Python-level stdout and stderr, every logging handler that wrote to them, and warnings all write
to one stream that keeps each finished line, a progress bar's last frame only, in <run>/train.log;
with -v it also shows each line on the console. Our own lines are unaffected:
`Say` holds the real stdout. Everything changed is put back when the run ends, so a second run in
the same process starts from the same state.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.text import Text

ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")  # cursor moves and colors of terminal progress bars
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LineLog(io.TextIOBase):
    """A text stream that appends finished lines to a file (created on the first line) and hands
    them to `echo`. Carriage returns start a new frame of the same line: only the last is kept."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = None):
        super().__init__()
        self.path, self.echo = path, echo
        self.partial = ""
        self.lines = 0
        self.file = None
        self.lock = threading.Lock()

    @property
    def encoding(self) -> str:
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        with self.lock:
            *finished, partial = (self.partial + text).split("\n")
            self.partial = last_frame(partial)
            for line in finished:
                self._keep(last_frame(line))
        return len(text)

    def _keep(self, line: str) -> None:
        line = ESCAPES.sub("", line).rstrip()
        if not line.strip():
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8", buffering=1)  # closed in close()
        self.file.write(line + "\n")
        self.lines += 1
        if self.echo:
            self.echo(line)

    def flush(self) -> None:
        if self.file:
            self.file.flush()

    def close(self) -> None:
        with self.lock:
            if self.partial.strip():
                self._keep(self.partial)
            self.partial = ""
            if self.file:
                self.file.close()
                self.file = None
        super().close()


def last_frame(line: str) -> str:
    frames = [f for f in line.split("\r") if f.strip()]
    return frames[-1] if frames else ""


def _stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger()] + [x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)]
    # a handler whose stream is a property (logging's lastResort kind) follows sys.stderr by itself
    return [h for logger in loggers for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
            and not isinstance(getattr(type(h), "stream", None), property)]


@contextlib.contextmanager
def library_output(path: Path, say, verbose: bool = False) -> Iterator[LineLog]:
    """Send library output to `path` (and, verbose, to the console dimmed) for the block's duration."""
    echo = (lambda line: say.console.print(Text(line, style="dim"), soft_wrap=True)) if verbose else None
    log = LineLog(path, echo)
    consoles = {id(s) for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)}
    moved = {h: h.stream for h in _stream_handlers() if id(h.stream) in consoles}
    for handler in moved:
        handler.setStream(log)
    ours = logging.StreamHandler(log)
    ours.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    logging.getLogger().addHandler(ours)
    shown = warnings.showwarning  # replaced too by some tools (pytest), so not left to stderr

    def show(message, category, filename, lineno, file=None, line=None):
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield log
    finally:
        warnings.showwarning = shown
        logging.getLogger().removeHandler(ours)
        # handlers made during the run (a library imported then) took our stream as their stderr
        for handler in _stream_handlers():
            if handler.stream is log:
                handler.setStream(moved.get(handler, sys.stderr))
        log.close()


def log_beside(run_root: Path | None, command: str) -> Path:
    """Where an after-training command keeps library output: `<run folder>/<command>.log` when the
    adapter is in a run folder this user can write, else a file in the temporary folder."""
    import os
    import tempfile

    if run_root is not None and os.access(run_root, os.W_OK):
        return run_root / f"{command}.log"
    return Path(tempfile.gettempdir()) / f"qlora-{command}-{os.getpid()}.log"


@contextlib.contextmanager
def quiet_libraries(path: Path, say, verbose: bool = False) -> Iterator[LineLog]:
    """`library_output`, then one line saying where the library output went (if there was any)."""
    with library_output(path, say, verbose) as chatter:
        try:
            yield chatter
        finally:
            if chatter.lines and not verbose:
                say.info(f"library output ({chatter.lines} lines: warnings, progress bars) is in {path}; "
                         "-v shows it live")
