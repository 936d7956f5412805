"""``diffexport serve ENGINE_DIR``: Triton Inference Server on an engine's model repository."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import typer

from diffexport.cli.app import app, fail
from diffexport.deploy.triton import (
    TritonError,
    TritonServer,
    available_backends,
    model_names,
    python_only_reason,
    repository_dir,
    write_repository,
)
from diffexport.engines.base import EngineError
from diffexport.engines.manifest import read_manifest


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@app.command()
def serve(
    engine_dir: Path = typer.Argument(..., help="Engine directory made by `diffexport build`."),
    http_port: int = typer.Option(0, help="HTTP port (0: a free one)."),
    grpc_port: int = typer.Option(0, help="gRPC port (0: a free one)."),
    metrics_port: int = typer.Option(0, help="Metrics port (0: a free one)."),
    python_only: bool = typer.Option(False, "--python-only", help="Serve the self-contained repository (Python backend only; the denoiser runs in-process)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    log_file: Path = typer.Option(None, help="Server log (default: a temporary file, printed)."),
    timeout: float = typer.Option(300.0, help="Seconds to wait for the models to load."),
) -> None:
    """Serve ENGINE_DIR with Triton: `<name>_sampler` (full sampling) and `<name>_denoiser` (one step)."""
    try:
        manifest = read_manifest(engine_dir)
        backends = available_backends()
    except (EngineError, TritonError) as e:
        raise fail(str(e)) from None
    reason = python_only_reason(manifest, backends, forced=python_only)
    if reason:
        typer.echo(f"serving the self-contained Python repository: {reason}")
    repo = repository_dir(engine_dir, python_only=reason is not None)
    try:
        if not repo.is_dir():
            repo = write_repository(engine_dir, python_only=reason is not None, manifest=manifest)
            typer.echo(f"wrote {repo}")
        server = TritonServer(repo, host=host, http_port=http_port or None, grpc_port=grpc_port or None,
                              metrics_port=metrics_port or None, log_file=log_file)
    except (EngineError, TritonError, OSError) as e:
        raise fail(str(e)) from None

    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}  # also when SIGINT was ignored
    try:
        typer.echo(f"starting tritonserver on {repo} (log: {server.log_file})")
        server.start(timeout)
        denoiser, sampler = model_names(manifest["name"])
        typer.echo(f"HTTP    {server.http_url}\ngRPC    {server.grpc_url}\nmetrics {server.metrics_url}")
        typer.echo(f"models  {sampler} (latents -> samples), {denoiser} (one denoiser call)\nready; Ctrl-C to stop")
        while server.running:
            time.sleep(0.5)
        raise fail(f"tritonserver exited unexpectedly (code {server.stop()}); log {server.log_file}:\n{server.log_tail()}")
    except TritonError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        typer.echo("stopping tritonserver")
        code = server.stop()
        typer.echo(f"stopped (exit code {code})")
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
