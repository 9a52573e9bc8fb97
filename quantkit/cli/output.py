"""The one output sink: rich for people on stdout, plain text or JSON for scripts, errors on stderr."""

from __future__ import annotations

import json
import sys
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

#: Rich sizes tables to the terminal, and to 80 columns when stdout is a pipe or a file, which cuts long
#: names ("Qwen2ForCausalL…") and breaks words. Scripts that grep the output get the full width instead.
PIPE_WIDTH = 10_000


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich exits 1 when the reader goes away; `quantkit archs | head -1` got what it asked for, so the
        # CLI edge (main.QuantkitGroup) turns this into exit status 0.
        raise BrokenPipeError


class Output:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        tty = sys.stdout.isatty()
        self.console = _Console(soft_wrap=False, highlight=False, width=None if tty else PIPE_WIDTH)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)

    def rich(self, renderable: Any) -> None:
        if not self.quiet:
            self.console.print(renderable)

    def text(self, text: str) -> None:
        """Exact text (markdown, a card): never wrapped or styled."""
        click.echo(text)

    def json(self, data: Any) -> None:
        click.echo(json.dumps(data, indent=2))

    def info(self, message: str) -> None:
        if not self.quiet:
            self.err.print(message, markup=False)

    def warn(self, message: str) -> None:
        # The message is text, not markup: "[publish]" in it must print as it is.
        self.err.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, markup=True)

    def error(self, message: str) -> None:
        click.echo(f"error: {message}", err=True)
