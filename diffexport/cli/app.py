"""The ``diffexport`` command: one typer app, one module per group of commands.

Every command registered on :data:`app` runs inside :func:`guarded`: whatever it raises becomes one
``error:`` line on stderr and a non-zero exit (``DIFFEXPORT_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True, highlight=False)
DEBUG_ENV = "DIFFEXPORT_DEBUG"


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` (plain text, not markup) as an error and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def describe(e: BaseException) -> str:
    """One line for an exception: the message of diffexport's own errors (they name the file, field or
    flag), the file and reason of an OS error, else the type and the first line of the message."""
    from diffexport.checkpoints import CheckpointError
    from diffexport.engines.base import EngineError
    from diffexport.recipes import RecipeError

    if isinstance(e, (RecipeError, EngineError, CheckpointError)):
        return str(e)
    if isinstance(e, MemoryError):
        return "out of memory: the request is too large for this machine (use a smaller --batch, --steps or input)"
    if isinstance(e, OSError) and e.errno is not None:
        where = f"{e.filename}: " if e.filename else ""
        hint = " (the disk is full; nothing was replaced)" if e.errno == errno.ENOSPC else ""
        return f"{where}{e.strerror or os.strerror(e.errno)}{hint}"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"unexpected {type(e).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)"


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with every exception turned into :func:`fail`'s one line (exit 1; Ctrl-C: 130)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as e:
            if os.environ.get(DEBUG_ENV):
                raise
            raise fail(describe(e)) from None

    return run


class _GuardedTyper(typer.Typer):
    """A Typer whose commands all run inside :func:`guarded`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        register = super().command(*args, **kwargs)

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            register(guarded(fn))
            return fn

        return decorator


app = _GuardedTyper(
    name="diffexport",
    help="Build, check, sample, benchmark and deploy diffusion-model engines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main(argv: list[str] | None = None) -> None:
    """Run the command line (the ``diffexport`` script); usage errors are one ``error:`` line too (exit 2)."""
    from typer._click import exceptions as click_errors  # typer's vendored click

    try:
        result = app(args=argv, standalone_mode=False, prog_name="diffexport")
    except click_errors.NoArgsIsHelpError as e:
        e.show()
        raise SystemExit(2) from None
    except click_errors.UsageError as e:
        cmd = e.ctx.command_path if e.ctx is not None else "diffexport"
        raise SystemExit(_usage(f"{e.format_message()} (see `{cmd} --help`)")) from None
    except click_errors.ClickException as e:
        raise SystemExit(_usage(e.format_message(), e.exit_code)) from None
    except typer.Abort:
        raise SystemExit(_usage("interrupted", 130)) from None
    raise SystemExit(result if isinstance(result, int) else 0)


def _usage(message: str, code: int = 2) -> int:
    fail(message)
    return code
