"""``diffexport cpp ENGINE_DIR``: build the embedded C++ sampler runner for an engine."""

from __future__ import annotations

from pathlib import Path

import typer

from diffexport.cli.app import app, console, fail
from diffexport.deploy.cpp import CppBuildError, build_cpp
from diffexport.engines.base import EngineError


@app.command()
def cpp(
    engine_dir: Path = typer.Argument(..., help="Engine directory made by `diffexport build` (needs the aoti target)."),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="Parallel compile jobs."),
) -> None:
    """Build ENGINE_DIR/cpp/diffexport-sample (cached across engines) and print its path."""
    try:
        binary = build_cpp(engine_dir, jobs=jobs, progress=lambda msg: console.print(msg, style="dim", markup=False))
    except (CppBuildError, EngineError) as e:
        raise fail(str(e)) from None
    typer.echo(binary)
