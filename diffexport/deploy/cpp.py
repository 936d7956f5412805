"""Build the embedded C++ runner ``diffexport-sample`` (sources in ``cpp/``) for an engine.

The CMake project is configured against libtorch from the installed torch wheel and built once
per (sources, torch, compiler, generator, system libraries) in a shared cache,
``~/.cache/diffexport/cpp-<key>`` (``$DIFFEXPORT_CACHE`` or ``$XDG_CACHE_HOME`` move it); engines get
a copy of the binary in ``ENGINE_DIR/cpp/`` with ``build.json``, the sha256 of every build input.

The binary carries no absolute path: its RUNPATH is ``$ORIGIN/lib``. It finds libtorch either on
``LD_LIBRARY_PATH`` (the wheel's ``torch/lib``, :func:`runner_env`) or in ``lib/`` next to it, which
:func:`bundle` fills with copies of the libtorch libraries it needs (a self-contained folder).
The system libraries come from Debian packages (:data:`PACKAGES`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

from diffexport.engines.manifest import read_manifest, record_tree
from diffexport.fileio import write_atomic

SOURCE_DIR = Path(__file__).with_name("cpp")
SOURCE_FOLDERS = ("include", "src", "examples")  # with CMakeLists.txt: what a build depends on
BINARY = "diffexport-sample"
BUILD_INPUTS = "build.json"
Progress = Callable[[str], None] | None

# The Debian 12 packages of the system libraries (CMakeLists.txt looks for them; setup.sh --dev installs them).
PACKAGES = ("nlohmann-json3-dev", "libssl-dev", "libcli11-dev")


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


def source_files() -> dict[str, str]:
    """sha256 of every build input (CMakeLists.txt, headers, sources, examples) by path under ``cpp/``."""
    paths = [SOURCE_DIR / "CMakeLists.txt", *(p for d in SOURCE_FOLDERS for p in (SOURCE_DIR / d).rglob("*") if p.is_file())]
    return {str(p.relative_to(SOURCE_DIR)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(paths)}


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`PACKAGES` (``dpkg-query``; empty where dpkg is absent)."""
    if shutil.which("dpkg-query") is None:
        return {}
    done = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", *PACKAGES], capture_output=True, text=True)
    return dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)


def build_inputs(tools: dict[str, str]) -> dict:
    """Everything the build depends on: every source file's sha256, torch, compiler, generator, packages."""
    import torch

    version = subprocess.run([tools["cxx"], "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return {"sources": source_files(), "torch": torch.__version__, "torch_prefix": tools["torch_prefix"], "compiler": tools["cxx"],
            "compiler_version": version, "generator": tools["generator"], "packages": package_versions(), "cmake_args": cmake_args()}


def build_key(inputs: dict) -> str:
    """Hash of :func:`build_inputs`: the shared cache folder's name."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def missing_packages(log_text: str) -> list[str]:
    """The Debian packages that a failed configure reported missing (CMakeLists.txt names them)."""
    found = re.findall(r"diffexport-missing-packages: ([a-z0-9.+\- ]+)", log_text)
    return found[-1].split() if found else []


def cmake_args() -> list[str]:
    """Extra CMake arguments from ``$DIFFEXPORT_CMAKE_ARGS`` (e.g. ``-DDIFFEXPORT_WITH_TENSORRT=ON``)."""
    return shlex.split(os.environ.get("DIFFEXPORT_CMAKE_ARGS", ""))


def torch_lib_dir() -> Path:
    """The torch wheel's ``lib`` folder (libtorch, libc10, its libgomp)."""
    import torch

    return Path(torch.__file__).parent / "lib"


def runner_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with the torch wheel's ``lib`` first on ``LD_LIBRARY_PATH``."""
    env = dict(os.environ if env is None else env)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(torch_lib_dir()), env.get("LD_LIBRARY_PATH", "")) if p)
    return env


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
    inputs = build_inputs(tools)  # hashed for the folder's name and recorded in it: one reading of the sources
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tree = root / f"cpp-{build_key(inputs)}"
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
            try:
                _run([tools["cmake"], "-S", str(SOURCE_DIR), "-B", str(tree), "-G", tools["generator"],
                      "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={tools['torch_prefix']}",
                      f"-DCMAKE_CXX_COMPILER={tools['cxx']}", *cmake_args()], log, "cmake configure")
            except CppBuildError:
                if missing := missing_packages(log.read_text(errors="replace")):
                    raise CppBuildError(f"the C++ runner needs the Debian package{'s' * (len(missing) > 1)} {', '.join(missing)}: "
                                        f"apt-get install -y {' '.join(missing)} (or ./setup.sh --dev); log: {log}") from None
                raise
            (tree / ".configured").touch()
        say(f"building {', '.join(todo)} (about 30 s on 2 cores)")
        _run([tools["cmake"], "--build", str(tree), "--parallel", str(jobs), "--target", *todo], log, "C++ build")
        write_atomic(tree / BUILD_INPUTS, json.dumps(inputs, indent=2).encode())
        for t in todo:
            (tree / f".built-{t}").touch()
    return tree


def _check_engine(engine_dir: Path, manifest: dict) -> None:
    if "aoti" not in (manifest.get("artifacts") or {}):
        built = ", ".join(manifest.get("artifacts") or {}) or "none"
        raise CppBuildError(f"{engine_dir}: the C++ runner needs an 'aoti' artifact (built: {built}); add aoti to export.targets")


def install_binary(tree: Path, out: Path) -> Path:
    """Copy the built runner to ``OUT/diffexport-sample`` (temp file, then rename) with ``OUT/build.json``."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{BINARY}.{os.getpid()}.tmp"
    shutil.copy2(tree / BINARY, tmp)
    os.replace(tmp, out / BINARY)
    write_atomic(out / BUILD_INPUTS, (json.dumps(json.loads((tree / BUILD_INPUTS).read_text()), indent=2) + "\n").encode())
    return out / BINARY


def bundle(tree: Path, dest: str | Path) -> Path:
    """A self-contained runner folder: ``DEST/diffexport-sample`` and, in ``DEST/lib``, copies of the
    libtorch libraries it loads (found with ``ldd``); it then runs without ``LD_LIBRARY_PATH``."""
    dest = Path(dest)
    binary = install_binary(tree, dest)
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=runner_env())
    torch_lib = torch_lib_dir().resolve()
    libs = [Path(m) for m in re.findall(r"=> (\S+) \(", done.stdout) if Path(m).resolve().parent == torch_lib]
    if done.returncode or not libs:
        raise CppBuildError(f"{binary}: cannot list the libtorch libraries it needs (ldd: {done.stderr.strip() or done.stdout.strip()})")
    (dest / "lib").mkdir(exist_ok=True)
    for lib in libs:
        tmp = dest / "lib" / f".{lib.name}.tmp"
        shutil.copy2(lib, tmp)
        os.replace(tmp, dest / "lib" / lib.name)
    return binary


def build_cpp(engine_dir: str | Path, *, jobs: int = 2, progress: Progress = None, bundle_dir: str | Path | None = None) -> Path:
    """Build (or reuse) the C++ runner and install it in ``ENGINE_DIR/cpp/`` (or, with ``bundle_dir``,
    as a self-contained :func:`bundle` there); returns the binary's path."""
    engine_dir = Path(engine_dir)
    _check_engine(engine_dir, read_manifest(engine_dir))
    tree = build_tree(jobs=jobs, progress=progress)
    return bundle(tree, bundle_dir) if bundle_dir is not None else install_binary(tree, engine_dir / "cpp")


def cpp_stage(engine_dir: Path, manifest: dict) -> None:
    """``build_engine`` finalize stage for ``deploy: {cpp: true}``: installs the runner in the
    temporary engine directory (the binary takes the engine path at run time, so the rename after
    the build does not matter) and records the sha256 of ``cpp/`` (binary and build.json) as the
    manifest's ``hashes.cpp``."""
    _check_engine(engine_dir, manifest)
    install_binary(build_tree(), engine_dir / "cpp")
    record_tree(engine_dir, manifest, "cpp")
