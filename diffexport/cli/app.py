"""The ``diffexport`` command: one typer app, one module per group of commands."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(
    name="diffexport",
    help="Build, check, sample, benchmark and deploy diffusion-model engines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` (plain text, not markup) as an error and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)
