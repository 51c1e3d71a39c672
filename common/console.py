"""Colored, plain-worded terminal output (green ok, yellow warning, red error)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape


class Say:
    def __init__(self, stream=None, color: bool | None = None):
        file = stream or sys.stdout
        self.console = Console(
            file=file, highlight=False, soft_wrap=True, no_color=color is False,
            force_terminal=color,
        )

    def info(self, message: str) -> None:
        self.console.print(escape(message))

    def ok(self, message: str) -> None:
        self.console.print(f"[green]✔[/green] {escape(message)}")

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]! {escape(message)}[/yellow]")

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]✘ {escape(message)}[/bold red]")

    def __call__(self, message: str) -> None:
        self.info(message)
