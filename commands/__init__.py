"""`qlora`: the command layer. One module per command; only this layer picks a backend (through
`backends.make_trainer`). Heavy frameworks load inside the commands that train or convert."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# The command modules, in --help order. They are imported by build_parser(), after main() has started
# the --time-budget clock: what they import counts against the budget as the rest of the run does.
COMMANDS = ("config", "train", "check", "plan", "demo", "data", "convert", "generate", "chat", "merge",
            "export", "push")
TRAINING = ("train", "demo", "plan")  # commands that train (plan --calibrate) and handle SIGTERM themselves


class Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for a mistyped command, choice or option."""

    def error(self, message: str):
        super().error(message + _did_you_mean(message, self))


def _did_you_mean(message: str, parser: argparse.ArgumentParser) -> str:
    choice = re.search(r"invalid choice: '?([^' ]+)'? \(choose from (.+)\)", message)
    if choice:
        typed, known = choice.group(1), [c.strip(" '") for c in choice.group(2).split(",")]
    else:
        unknown = re.search(r"unrecognized arguments: (.+)", message)
        typed = next((word for word in (unknown.group(1).split() if unknown else []) if word.startswith("-")), "")
        known = [flag for action in parser._actions for flag in action.option_strings]
    close = difflib.get_close_matches(typed.split("=")[0], known, n=1, cutoff=0.6) if typed else []
    return f"; did you mean {close[0]}?" if close else ""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qlora",
        description="QLoRA fine-tuning of Mistral-7B-Instruct-v0.3 on an H100 (CUDA) or an Apple M4 (MLX).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"commands.{name}").add_parser(sub)
    return parser


def version() -> str:
    """This checkout's version (its pyproject.toml), else the installed package's."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) if pyproject.is_file() else None
    if found:
        return found.group(1)
    from importlib.metadata import version as installed

    return installed("mistral-qlora")


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()  # a --time-budget counts from here: imports and model loading included
    from common.console import Say
    from common.errors import QLoraError

    say = Say()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # told by the command's own parser: its usage, its options to suggest
        parser._subparsers._group_actions[0].choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.started = started
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `qlora train --gpus N` re-runs under torchrun
    try:
        with _sigterm_as_interrupt(args.command not in TRAINING):
            return args.handler(args, say)
    except QLoraError as exc:  # errors go to stderr: stdout may be a result (generate's answer, --json)
        Say(sys.stderr).error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        Say(sys.stderr).error("interrupted")
        return 130


@contextlib.contextmanager
def _sigterm_as_interrupt(active: bool):
    """SIGTERM (`kill`, `timeout`, a scheduler) stops a command as Ctrl-C does: its cleanup runs (a
    merge's partial output is removed) and it says so, instead of dying in silence with half a file.
    Training commands handle SIGTERM themselves (a checkpoint is saved)."""
    import signal
    import threading

    if not active or threading.current_thread() is not threading.main_thread():
        yield
        return

    from common.errors import Terminated

    def interrupt(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
