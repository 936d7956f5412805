"""AOTInductor compiles in child processes, beside the build's other targets.

An AOTInductor compile is mostly single-threaded (Inductor's Python lowering and code generation,
then g++), and so is the ONNX export; on a 2-core machine they overlap when each compile runs in
its own process (EDM CIFAR-10, ``targets: auto, precision: auto``: see BENCHMARKS.md). The parent
saves each program (``torch.export.save``) into a work folder and starts one
``python -m diffexport.export.worker WORK PARENT_PID INDEX`` per program; each child compiles its
program with :func:`~diffexport.export.aoti.export_aoti` and writes ``<INDEX>.json`` (the artifact's
manifest fields, or the error). A child dies with its parent (``PR_SET_PDEATHSIG`` on Linux), and
:meth:`AotiWorker.close` kills them when the build fails or is interrupted.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.export import ExportedProgram

import diffexport
from diffexport.export.tensorrt import TargetUnavailable
from diffexport.fileio import write_atomic
from diffexport.recipes import IOSpec

POLL_S = 0.1


class AotiWorker:
    """AOTInductor compiles of ``jobs`` (``{key: (program, package path, precision)}``), each in its
    own child process, all started at once; :meth:`result` waits for one, :meth:`close` ends them."""

    def __init__(self, jobs: dict[str, tuple[ExportedProgram, Path, str]], io: IOSpec, device: str, work_dir: Path):
        self.work, self.keys = Path(work_dir), list(jobs)
        self.work.mkdir()
        records = []
        for i, (program, path, precision) in enumerate(jobs.values()):
            torch.export.save(program, self.work / f"{i}.pt2")
            records.append({"program": f"{i}.pt2", "path": str(path), "precision": precision})
        write_atomic(self.work / "jobs.json", json.dumps({"io": io.to_dict(), "device": device, "jobs": records}).encode())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(diffexport.__file__).resolve().parents[1]),
                                                             *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.processes: list[subprocess.Popen] = []
        try:
            for i in range(len(records)):
                with open(self.work / f"{i}.log", "wb") as log:
                    self.processes.append(subprocess.Popen(
                        [sys.executable, "-m", "diffexport.export.worker", str(self.work), str(os.getpid()), str(i)],
                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env))
        except BaseException:
            self.close()
            raise

    def result(self, key: str) -> tuple[dict, float]:
        """``(manifest fields, compile seconds)`` of job ``key``, waiting for it; its error re-raised
        (``TargetUnavailable`` and built-in exception types as themselves, others as ``RuntimeError``)."""
        i = self.keys.index(key)
        done, process = self.work / f"{i}.json", self.processes[i]
        while not done.exists():
            if process.poll() is not None and not done.exists():
                tail = (self.work / f"{i}.log").read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"the AOTInductor worker process exited with status {process.returncode} "
                                   f"before compiling {key}: {' | '.join(tail) or 'no output'}")
            time.sleep(POLL_S)
        out = json.loads(done.read_text())
        if "error" in out:
            kind = TargetUnavailable if out["type"] == "TargetUnavailable" else getattr(builtins, out["type"], None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                raise RuntimeError(f"{out['type']}: {out['error']}")
            raise kind(out["error"])
        return out["fields"], out["seconds"]

    def close(self) -> None:
        """Kill the children that still run, and remove the work folder."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        shutil.rmtree(self.work, ignore_errors=True)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (Linux), so a killed build leaves no compile running."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def main(work: Path, parent: int, index: int) -> None:
    from diffexport.export.aoti import export_aoti

    _die_with_parent(parent)
    spec = json.loads((work / "jobs.json").read_text())
    job = spec["jobs"][index]
    start = time.perf_counter()
    try:
        program = torch.export.load(work / job["program"])
        out = {"fields": export_aoti(program, IOSpec.from_dict(spec["io"]), job["path"], precision=job["precision"], device=spec["device"])}
    except Exception as e:  # noqa: BLE001 -- reported to the parent, which decides
        out = {"type": type(e).__name__, "error": str(e)}  # whole: the build shortens it where it reports it
    out["seconds"] = round(time.perf_counter() - start, 3)
    write_atomic(work / f"{index}.json", json.dumps(out).encode())


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
