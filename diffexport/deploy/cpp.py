"""Build the embedded C++ runner ``diffexport-sample`` (sources in ``cpp/``) for an engine.

The CMake project is configured against libtorch from the installed torch wheel and built once
per (sources, torch, compiler, generator) in a shared cache, ``~/.cache/diffexport/cpp-<key>``
(``$DIFFEXPORT_CACHE`` or ``$XDG_CACHE_HOME`` move it); engines get a copy of the binary in
``ENGINE_DIR/cpp/``. The binary finds libtorch through an RPATH to the wheel's ``lib`` folder and
takes the engine directory on its command line, so it survives the engine directory's rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from diffexport.engines.manifest import read_manifest

SOURCE_DIR = Path(__file__).with_name("cpp")
SOURCE_FOLDERS = ("include", "src", "examples")  # with CMakeLists.txt: what a build depends on
BINARY = "diffexport-sample"
Progress = Callable[[str], None] | None


class CppBuildError(RuntimeError):
    """The C++ runner cannot be built; the message names the missing tool, engine or log file."""


def cache_root() -> Path:
    """Where shared builds live: ``$DIFFEXPORT_CACHE``, else ``$XDG_CACHE_HOME/diffexport`` (``~/.cache``)."""
    if os.environ.get("DIFFEXPORT_CACHE"):
        return Path(os.environ["DIFFEXPORT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "diffexport"


def _which(names: Iterable[str], what: str) -> str:
    for name in names:
        if name and (path := shutil.which(name)):
            return path
    raise CppBuildError(f"{what} not found on PATH (tried {', '.join(n for n in names if n)}); install it to build the C++ runner")


def _toolchain() -> dict[str, str]:
    """cmake, the C++ compiler, the generator and libtorch's CMake prefix."""
    import torch.utils

    cmake = _which(["cmake"], "cmake")
    cxx = _which([os.environ.get("CXX", ""), "c++", "g++", "clang++"], "a C++ compiler")
    generator = "Ninja" if shutil.which("ninja") else "Unix Makefiles"
    return {"cmake": cmake, "cxx": cxx, "generator": generator, "torch_prefix": torch.utils.cmake_prefix_path}


def build_key(tools: dict[str, str]) -> str:
    """Hash of everything the build depends on: every source file, torch, compiler, generator."""
    import torch

    h = hashlib.sha256()
    sources = [SOURCE_DIR / "CMakeLists.txt", *(p for d in SOURCE_FOLDERS for p in (SOURCE_DIR / d).rglob("*") if p.is_file())]
    for path in sorted(sources):
        h.update(str(path.relative_to(SOURCE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    version = subprocess.run([tools["cxx"], "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    for part in (torch.__version__, tools["torch_prefix"], tools["cxx"], version, tools["generator"]):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _run(cmd: list[str], log: Path, what: str) -> None:
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise CppBuildError(f"{what} failed (exit {done.returncode}); full log: {log}\n{tail}")


def build_tree(*, jobs: int = 2, progress: Progress = None, targets: tuple[str, ...] = (BINARY,)) -> Path:
    """Configure and build ``targets`` in the shared cache (reused when nothing changed); returns the build folder.

    ``targets`` may add ``embed`` (``cpp/examples/embed.cpp`` linked against the runtime library).
    Concurrent builds of the same key wait for each other on a lock file.
    """
    say = progress or (lambda msg: None)
    tools = _toolchain()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tree = root / f"cpp-{build_key(tools)}"
    with open(root / f"{tree.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        todo = [t for t in targets if not (tree / f".built-{t}").exists()]
        if not todo:
            say(f"reusing the C++ build in {tree}")
            return tree
        tree.mkdir(exist_ok=True)
        log = tree / "build.log"
        if not (tree / ".configured").exists():
            say(f"configuring the C++ runner in {tree}")
            _run([tools["cmake"], "-S", str(SOURCE_DIR), "-B", str(tree), "-G", tools["generator"],
                  "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={tools['torch_prefix']}",
                  f"-DCMAKE_CXX_COMPILER={tools['cxx']}"], log, "cmake configure")
            (tree / ".configured").touch()
        say(f"building {', '.join(todo)} (about 30 s on 2 cores)")
        _run([tools["cmake"], "--build", str(tree), "--parallel", str(jobs), "--target", *todo], log, "C++ build")
        for t in todo:
            (tree / f".built-{t}").touch()
    return tree


def _check_engine(engine_dir: Path, manifest: dict) -> None:
    if "aoti" not in (manifest.get("artifacts") or {}):
        built = ", ".join(manifest.get("artifacts") or {}) or "none"
        raise CppBuildError(f"{engine_dir}: the C++ runner needs an 'aoti' artifact (built: {built}); add aoti to export.targets")


def install_binary(tree: Path, engine_dir: Path) -> Path:
    """Copy the built runner to ``ENGINE_DIR/cpp/diffexport-sample`` (temp file, then rename)."""
    out = engine_dir / "cpp"
    out.mkdir(exist_ok=True)
    tmp = out / f".{BINARY}.{os.getpid()}.tmp"
    shutil.copy2(tree / BINARY, tmp)
    os.replace(tmp, out / BINARY)
    return out / BINARY


def build_cpp(engine_dir: str | Path, *, jobs: int = 2, progress: Progress = None) -> Path:
    """Build (or reuse) the C++ runner and install it in ``ENGINE_DIR/cpp/``; returns the binary's path."""
    engine_dir = Path(engine_dir)
    _check_engine(engine_dir, read_manifest(engine_dir))
    return install_binary(build_tree(jobs=jobs, progress=progress), engine_dir)


def cpp_stage(engine_dir: Path, manifest: dict) -> None:
    """``build_engine`` finalize stage for ``deploy: {cpp: true}``: installs the runner in the
    temporary engine directory (the binary takes the engine path at run time, so the rename after
    the build does not matter)."""
    _check_engine(engine_dir, manifest)
    install_binary(build_tree(), engine_dir)
