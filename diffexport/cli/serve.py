"""``diffexport serve ENGINE_DIR``: Triton Inference Server on an engine's model repository.

Before anything runs: the engine's parity verdict (refused unless ``--allow-unverified``), and the
repository's files against their hashes in ``manifest.json`` (the models' ``model.py`` is
executed by the server). The server is supervised: if it dies, it is restarted on the same ports
and the log says so.
"""

from __future__ import annotations

import signal
import socket
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
from diffexport.deploy.triton.config import Instances
from diffexport.deploy.triton.repository import recipe_instances, served_backend, verify_repository
from diffexport.deploy.triton.server import OPENMP_BACKENDS
from diffexport.engines.base import EngineError
from diffexport.engines.manifest import read_manifest
from diffexport.engines.verdict import ALLOW_FLAG, require_verified

RESTART_WINDOW_S = 60.0  # restarts older than this are forgotten when counting --max-restarts


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def parse_gpus(text: str | None) -> tuple[int, ...]:
    """``--gpus 0,1`` -> (0, 1); ``ValueError`` naming the flag otherwise."""
    if not text:
        return ()
    try:
        ids = tuple(int(g) for g in text.split(","))
    except ValueError:
        raise ValueError(f"--gpus: expected comma-separated device ids such as 0,1, got {text!r}") from None
    if any(g < 0 for g in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"--gpus: device ids must be distinct and >= 0, got {text!r}")
    return ids


def check_host(host: str) -> None:
    """``ValueError`` naming ``--host`` when it is not an address this machine can listen on."""
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"--host {host!r}: not an address to listen on ({getattr(e, 'strerror', None) or e})") from None


def _repository(engine_dir: Path, manifest: dict, python_only: bool, instances: Instances | None,
                allow_unverified: bool, rewrite: bool, queue_delay_ms: float | None = None) -> Path:
    """The repository to serve: (re)written when missing, unhashed, or when options ask for other
    configs; otherwise verified against its hashes."""
    repo = repository_dir(engine_dir, python_only)
    recorded = (manifest.get("hashes") or {}).get(repo.name)
    if rewrite or instances is not None or queue_delay_ms is not None or allow_unverified or not repo.is_dir() or not recorded:
        repo = write_repository(engine_dir, python_only=python_only, instances=instances, allow_unverified=allow_unverified,
                                queue_delay_ms=queue_delay_ms)
        typer.echo(f"wrote {repo}")
        manifest = read_manifest(engine_dir)
    verify_repository(engine_dir, manifest, repo.name)
    return repo


@app.command()
def serve(
    engine_dir: Path = typer.Argument(..., help="Engine directory made by `diffexport build`."),
    http_port: int = typer.Option(0, min=0, max=65535, help="HTTP port (0: a free one)."),
    grpc_port: int = typer.Option(0, min=0, max=65535, help="gRPC port (0: a free one)."),
    metrics_port: int = typer.Option(0, min=0, max=65535, help="Metrics port (0: a free one)."),
    python_only: bool = typer.Option(False, "--python-only", help="Serve the self-contained repository (Python backend only; the denoiser runs in-process)."),
    instances: int = typer.Option(None, "--instances", help="Instances of each model (per GPU with --gpus); default: the recipe's deploy.triton_instances."),
    gpus: str = typer.Option(None, "--gpus", help="Comma-separated GPU ids for the denoiser, e.g. 0,1 (Triton instance_group KIND_GPU)."),
    queue_delay_ms: float = typer.Option(None, "--queue-delay-ms", help="How long the sampler's dynamic batcher waits for more requests (ms); default: the recipe's deploy.triton_queue_delay_ms (20)."),
    allow_unverified: bool = typer.Option(False, ALLOW_FLAG, help="Serve an engine whose parity verdict is not ok (debugging)."),
    rewrite: bool = typer.Option(False, "--rewrite", help="Rewrite the repository (and its hashes) from the engine before serving."),
    write_only: bool = typer.Option(False, "--write-only", help="Write (and verify) the repository, print its path and exit: for your own tritonserver, KServe, ..."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    log_file: Path = typer.Option(None, help="Server log (default: a temporary file, printed)."),
    timeout: float = typer.Option(300.0, min=1, max=86400, help="Seconds to wait for the models to load."),
    max_restarts: int = typer.Option(5, min=0, help=f"Restarts of a server that died within {RESTART_WINDOW_S:.0f} s before giving up."),
) -> None:
    """Serve ENGINE_DIR with Triton: `<name>_sampler` (full sampling) and `<name>_denoiser` (one step)."""
    try:
        if instances is not None and instances < 1:
            raise ValueError(f"--instances: must be at least 1, got {instances}")
        if queue_delay_ms is not None and not 0 <= queue_delay_ms <= 60_000:
            raise ValueError(f"--queue-delay-ms: must be in [0, 60000], got {queue_delay_ms}")
        ids = parse_gpus(gpus)
        ports = [p for p in (http_port, grpc_port, metrics_port) if p]
        if len(set(ports)) != len(ports):
            raise ValueError(f"--http-port, --grpc-port, --metrics-port: must be distinct, got {http_port}, {grpc_port}, {metrics_port}")
        if not write_only:
            check_host(host)
        if log_file is not None and log_file.is_dir():
            raise ValueError(f"--log-file {log_file}: is a folder; name the log file to write")
        manifest = read_manifest(engine_dir)
        # --write-only: for a Triton of the user's own, whatever this machine's tritonserver (if any) can load
        reason = python_only_reason(manifest, None if write_only else available_backends(), forced=python_only, gpu=bool(ids))
        require_verified(engine_dir, manifest, served_backend(manifest, reason is not None, bool(ids)), allow_unverified=allow_unverified)
    except (EngineError, TritonError, ValueError) as e:
        raise fail(str(e)) from None
    if reason:
        typer.echo(f"{'writing' if write_only else 'serving'} the self-contained Python repository: {reason}")
    wanted = None
    if instances is not None or ids:
        wanted = Instances(instances or recipe_instances(manifest).count, ids)
    try:
        repo = _repository(engine_dir, manifest, reason is not None, wanted, allow_unverified, rewrite, queue_delay_ms)
        if write_only:
            typer.echo(repo)
            return
        server = TritonServer(repo, host=host, http_port=http_port or None, grpc_port=grpc_port or None,
                              metrics_port=metrics_port or None, log_file=log_file,
                              sleep_idle_threads=served_backend(manifest, reason is not None, bool(ids)) not in OPENMP_BACKENDS)
    except (EngineError, TritonError, OSError, ImportError) as e:
        raise fail(str(e)) from None

    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}  # also when SIGINT was ignored
    try:
        typer.echo(f"starting tritonserver on {repo} (log: {server.log_file})")
        server.start(timeout)
        denoiser, sampler = model_names(manifest["name"])
        typer.echo(f"HTTP    {server.http_url}\ngRPC    {server.grpc_url}\nmetrics {server.metrics_url}")
        typer.echo(f"models  {sampler} (latents -> samples), {denoiser} (one denoiser call)\nready; Ctrl-C to stop", )
        restarts: list[float] = []
        while True:
            while server.running:
                time.sleep(0.5)
            code = server.stop()
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW_S]
            if len(restarts) >= max_restarts:
                raise fail(f"tritonserver exited unexpectedly (code {code}) {len(restarts) + 1} times within "
                           f"{RESTART_WINDOW_S:.0f} s; giving up; log {server.log_file}:\n{server.log_tail()}")
            restarts.append(now)
            typer.echo(f"tritonserver exited unexpectedly (code {code}); restarting it (restart {len(restarts)} "
                       f"of at most {max_restarts} within {RESTART_WINDOW_S:.0f} s); log {server.log_file}", err=True)
            server.start(timeout)
            typer.echo("ready again after restart")
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
