"""``diffexport cpp ENGINE_DIR``: build the embedded C++ sampler runner for an engine."""

from __future__ import annotations

from pathlib import Path

import typer

from diffexport.cli.app import app, console, fail
from diffexport.deploy.cpp import CppBuildError, build_cpp, torch_lib_dir
from diffexport.engines.base import EngineError


@app.command()
def cpp(
    engine_dir: Path = typer.Argument(..., help="Engine directory made by `diffexport build` (needs the aoti target)."),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="Parallel compile jobs."),
    bundle: Path | None = typer.Option(None, "--bundle", help="Write a self-contained runner folder here instead: "
                                       "the binary plus copies of the libtorch libraries it loads (about 440 MB)."),
) -> None:
    """Build ENGINE_DIR/cpp/diffexport-sample (cached across engines) and print its path.

    The binary finds libtorch on LD_LIBRARY_PATH (the torch wheel's lib folder) or, with --bundle,
    in the lib/ folder next to it.
    """
    try:
        binary = build_cpp(engine_dir, jobs=jobs, progress=lambda msg: console.print(msg, style="dim", markup=False), bundle_dir=bundle)
    except (CppBuildError, EngineError) as e:
        raise fail(str(e)) from None
    if bundle is None:
        console.print(f"run it with LD_LIBRARY_PATH={torch_lib_dir()} (or build a --bundle)", style="dim", markup=False)
    typer.echo(binary)
