"""Run the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel (the ``[triton]`` extra).

The wheel holds Triton's server binary, its Python backend and one Python-backend stub per
Python version. :func:`backend_directory` assembles a writable backend folder in the user's cache
with the stub matching this interpreter; :class:`TritonServer` starts the server on it with this
environment's ``bin`` first on ``PATH`` (the stub runs the first ``python3`` there, so models can
import ``diffexport``), waits until ``tritonclient`` says it is ready and stops it cleanly.

>>> with TritonServer("engines/quickstart/triton-python") as server:
...     print(server.http_url)
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import IO

EXTRA_HINT = "install the [triton] extra: pip install 'diffexport[triton]' (nvidia-pytriton provides tritonserver)"


class TritonError(RuntimeError):
    """Triton missing, or a server that failed to start; the message says what to do or shows its log."""


def triton_home() -> Path:
    """``pytriton/tritonserver`` of the installed ``nvidia-pytriton`` wheel; ``TritonError`` naming the extra if absent."""
    spec = importlib.util.find_spec("pytriton")
    home = Path(spec.origin).parent / "tritonserver" if spec and spec.origin else None
    if home is None or not (home / "bin" / "tritonserver").is_file():
        raise TritonError(f"the tritonserver binary was not found; {EXTRA_HINT}")
    return home


def _libs_dir(home: Path) -> Path:
    return home.parent.parent / "nvidia_pytriton.libs"


def backend_directory(cache: Path | None = None) -> Path:
    """A writable copy of the wheel's backends with the Python stub for this interpreter, made once
    under ``~/.cache/diffexport/triton`` (``$XDG_CACHE_HOME``) and reused (the wheel stays untouched)."""
    home = triton_home()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in (home / "python_backend_stubs").iterdir())
        raise TritonError(f"{stub.parent}: no Python backend stub for Python {version} (the wheel has {', '.join(have)})")
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "diffexport" / "triton"
    target = cache / f"pytriton-{metadata.version('nvidia-pytriton')}-py{version}" / "backends"
    if (target / "python" / stub.name).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".backends.", dir=target.parent))
    for backend in (home / "backends").iterdir():
        if backend.name == "python":
            shutil.copytree(backend, tmp / "python", ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy2(stub, tmp / "python" / stub.name)
        elif backend.is_dir():
            (tmp / backend.name).symlink_to(backend)
    try:
        tmp.rename(target)
    except OSError:  # made meanwhile by another process
        shutil.rmtree(tmp)
    return target


def available_backends(backend_dir: Path | None = None) -> set[str]:
    """Names of the backends Triton can load from ``backend_dir`` (default: the wheel's)."""
    directory = backend_dir or triton_home() / "backends"
    return {p.name for p in directory.iterdir() if p.is_dir() and any(p.glob("libtriton_*.so"))}


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


#: backends whose engines run on OpenMP threads: under ``OMP_WAIT_POLICY=PASSIVE`` each of their ops wakes
#: sleeping threads (quickstart AOTInductor engine, batch 1: 2.2 ms per call -> 13 ms; EDM CIFAR-10 torch eager +30 %)
OPENMP_BACKENDS = ("aoti", "aoti-bf16", "torch")


class TritonServer:
    """A ``tritonserver`` process serving ``repository``: ``start()``, ``ready()``, ``stop()``, or ``with``.

    Ports left ``None`` are picked free on ``host``. Server output (the models' prints included)
    goes to ``log_file`` (a temporary file by default, kept after stop for inspection).
    ``exit_timeout``: seconds Triton waits on stop for models to unload (Python models took up to
    20 s on a loaded 2-core machine). ``sleep_idle_threads``: set ``OMP_WAIT_POLICY=PASSIVE`` for the
    model stubs (unless the environment sets it), so that the sampler's and the denoiser's idle OpenMP
    threads do not spin on the cores they share; leave it off for an OpenMP denoiser (AOTInductor,
    torch), whose every op would then wake sleeping threads (see :data:`OPENMP_BACKENDS`).
    """

    def __init__(
        self, repository: str | Path, *, host: str = "127.0.0.1", http_port: int | None = None,
        grpc_port: int | None = None, metrics_port: int | None = None, log_file: str | Path | None = None,
        exit_timeout: int = 30, sleep_idle_threads: bool = True,
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise TritonError(f"{self.repository}: model repository not found")
        self.host = host
        picked = iter(free_ports(3, host if host not in ("", "0.0.0.0") else "127.0.0.1"))
        self.http_port, self.grpc_port, self.metrics_port = (p if p else next(picked) for p in (http_port, grpc_port, metrics_port))
        if log_file is None:
            fd, log_file = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(fd)
        self.log_file = Path(log_file)
        self.exit_timeout, self.sleep_idle_threads = exit_timeout, sleep_idle_threads
        self._proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def _connect_host(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host

    @property
    def http_url(self) -> str:
        return f"http://{self._connect_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"grpc://{self._connect_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._connect_host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """The ``tritonserver`` command line."""
        home = triton_home()
        return [
            str(home / "bin" / "tritonserver"), "--model-repository", str(self.repository),
            "--backend-directory", str(backend_directory()),
            "--http-address", self.host, "--http-port", str(self.http_port),
            "--grpc-address", self.host, "--grpc-port", str(self.grpc_port),
            "--metrics-address", self.host, "--metrics-port", str(self.metrics_port),
            "--exit-timeout-secs", str(self.exit_timeout),
            # The configs are complete: without this the Python backend starts one more stub per
            # model only to auto-complete its config, importing torch and diffexport there too
            # (4.4 of the 7 s a quickstart model took to load).
            "--disable-auto-complete-config",
        ]

    def environment(self) -> dict[str, str]:
        """This environment with its ``bin`` first on ``PATH`` and the wheel's libraries on ``LD_LIBRARY_PATH``."""
        bindir = Path(sys.executable).parent
        if not (bindir / "python3").exists():
            raise TritonError(f"{bindir}: no python3 next to {sys.executable}; the Python backend stub runs the first python3 on PATH")
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(bindir), env.get("PATH", "")])
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ inside the hashed repository
        if self.sleep_idle_threads:  # the sampler and denoiser stubs share the cores: idle OpenMP threads sleep, not spin
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(_libs_dir(triton_home())), env.get("LD_LIBRARY_PATH")]))
        return env

    def start(self, timeout: float = 180.0) -> TritonServer:
        """Start the server and wait until ``/v2/health/ready`` (every model loaded)."""
        if self.running:
            return self
        cmd, env = self.command(), self.environment()
        self._log = open(self.log_file, "ab")
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True)  # its own process group: a terminal's Ctrl-C reaches us only
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()
                raise TritonError(f"tritonserver exited with code {code} before it was ready; log {self.log_file}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TritonError(f"tritonserver was not ready after {timeout:.0f} s; log {self.log_file}:\n{self.log_tail()}")
            time.sleep(0.25)
        return self

    def ready(self) -> bool:
        """Whether the server says it is ready (every model loaded), asked with ``tritonclient`` over HTTP."""
        try:
            import tritonclient.http as httpclient
        except ImportError as e:
            raise TritonError(f"tritonclient is missing ({e}); {EXTRA_HINT}") from None
        client = httpclient.InferenceServerClient(f"{self._connect_host}:{self.http_port}", connection_timeout=2.0, network_timeout=2.0)
        try:
            return bool(client.is_server_ready())
        except Exception:  # refused, reset or timed out: not ready (yet)
            return False
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM (Triton finishes in-flight requests), then SIGKILL of its process group after
        ``timeout`` (default: the exit timeout + 10 s); returns the exit code."""
        proc, code = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout if timeout is not None else self.exit_timeout + 10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            code = proc.returncode
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the server log, without its status tables and blank lines."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join([line for line in text.splitlines() if line.strip() and line[0] not in "|+"][-lines:])

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
