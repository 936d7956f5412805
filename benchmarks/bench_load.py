"""Load time: wall-clock of fresh interpreters importing / loading / sampling, and what they import.

    PYTHONPATH=$PWD python benchmarks/bench_load.py ENGINE_DIR [--runs 5]

Each scenario runs ``--runs`` times in a new subprocess (OMP_NUM_THREADS=1); the median is printed
with its ratio to ``import torch`` and whether tensordict / torch._dynamo / the exporter got imported.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HEAVY = ("tensordict", "torch._dynamo", "torch.onnx", "onnxscript", "onnx_ir", "tensorrt", "diffexport.export")

SCENARIOS = {
    "import torch": "import torch",
    "import diffexport.engines": "import diffexport.engines",
    "import diffexport.runtime": "import diffexport.runtime",
    "load + run ONNX engine + sample 2 steps": (
        "import torch\nfrom diffexport.engines import load\nfrom diffexport.engines.manifest import read_manifest\n"
        "from diffexport.runtime import sample\n"
        "e = load(ENGINE, 'onnxruntime', allow_unverified=True)\n"
        "sample(e, read_manifest(ENGINE)['sampler'], batch=2, num_steps=2,\n       conditions={'class_labels': torch.eye(10)[:2]})"
    ),
    "Triton sampler model imports": (
        "import diffexport.deploy.triton.backend, diffexport.deploy.triton.config, diffexport.engines.manifest\n"
        "import diffexport.recipes, diffexport.runtime.sampler"
    ),
    "Triton denoiser model imports + load": (
        "import torch, diffexport.deploy.triton.backend\nfrom diffexport.engines import load\n"
        "load(ENGINE, 'onnxruntime', allow_unverified=True)"
    ),
}

PROBE = "\nimport sys, json, time\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"


def run_once(code: str, engine: str) -> tuple[float, list[str]]:
    script = ("import time\n_t0 = time.perf_counter()\n" + code.replace("ENGINE", repr(engine))
              + "\n_dt = time.perf_counter() - _t0" + PROBE.format(heavy=HEAVY) + "\nprint(_dt)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = out.stdout.strip().splitlines()
    return float(lines[-1]), json.loads(lines[-2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}")
    base = None
    for name, code in SCENARIOS.items():
        times, heavy = [], []
        for _ in range(args.runs):
            t, heavy = run_once(code, args.engine)
            times.append(t)
        med = statistics.median(times)
        base = base or med
        print(f"{name:42s} median {med:6.2f} s  ({med / base:4.2f}x import torch, +{med - base:5.2f} s)  heavy: {heavy}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
