"""C++ runner (``diffexport-sample``) vs the Python runtime: sampling time and parity per engine.

    python benchmarks/bench_cpp.py ENGINE_DIR [ENGINE_DIR ...] [--batch 4] [--repeats 3] [--threads 1]

Both sample ``--batch`` images from seed 0 with the manifest's sampler on the engine's AOTInductor
package (verified engines only). Times are the sampling loop alone (the runner's own figure; the
Python call after one warm-up run), median of ``--repeats``; the C++ process wall time (libtorch
load, sha256 check, package unpack included) is reported too. Parity: relative L2 of the samples.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffexport.deploy.cpp import build_cpp, runner_env
from diffexport.engines import load
from diffexport.runtime.sampler import sample


def bench(engine_dir: Path, batch: int, repeats: int, threads: int) -> dict:
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    binary = build_cpp(engine_dir)
    torch.set_num_threads(threads)
    engine = load(engine_dir, "aoti")
    ref = sample(engine, manifest["sampler"], batch=batch, seed=0)  # warm-up
    py = []
    for _ in range(repeats):
        start = time.perf_counter()
        ref = sample(engine, manifest["sampler"], batch=batch, seed=0)
        py.append(time.perf_counter() - start)
        time.sleep(0.3)
    cpp, wall = [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.npy"
        for _ in range(repeats):
            start = time.perf_counter()
            done = subprocess.run([str(binary), "--engine", str(engine_dir), "--batch", str(batch), "--seed", "0", "--threads", str(threads),
                                   "--out", str(out)], capture_output=True, text=True, env=runner_env(), check=True)
            wall.append(time.perf_counter() - start)
            cpp.append(float(re.search(r", ([0-9.]+) s \(", done.stderr).group(1)))
            time.sleep(0.3)
        ours = torch.from_numpy(np.load(out))
    s = manifest["sampler"]
    return {"engine": manifest["name"], "sampler": f"{s['scheduler']['class']} + {s['solver']}, {s['num_steps']} steps", "batch": batch,
            "python_s": statistics.median(py), "cpp_s": statistics.median(cpp), "cpp_wall_s": statistics.median(wall),
            "rel_l2": float((ours - ref).norm() / ref.norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engines", nargs="+", type=Path)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print("| engine | sampler | N | Python sampling | C++ sampling | C++ process wall | rel. L2 |\n|---|---|---|---|---|---|---|")
    for engine_dir in args.engines:
        r = bench(engine_dir, args.batch, args.repeats, args.threads)
        print(f"| {r['engine']} | {r['sampler']} | {r['batch']} | {r['python_s']:.3f} s | {r['cpp_s']:.3f} s | {r['cpp_wall_s']:.2f} s | {r['rel_l2']:.1e} |")


if __name__ == "__main__":
    main()
