"""The one output sink: rich for people on stdout, plain text or JSON for scripts, errors on stderr."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.markup import escape


class Output:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.console = Console(soft_wrap=False, highlight=False)
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
