"""OpenVINO artifact size and load: an engine's recorded OpenVINO artifacts against a fresh export of
the same ONNX with the current ``export_openvino`` (weightless blobs + IR), outputs compared.

    PYTHONPATH=$PWD python benchmarks/bench_openvino_blobs.py ENGINE_DIR [--out /tmp/ov-blobs]

ENGINE_DIR is an engine built with an ``openvino`` target (e.g. by ``bench_openvino.py``), possibly by
an older diffexport whose blobs held the weights. Prints JSON per artifact: MB before/now, the wall
clock of loading plus a call at the smallest and the largest static batch, the largest output
difference, and the per-call median of both engines at each static batch (interleaved turns with a
0.2 s pause, two timed calls per turn; ``--repeats`` turns).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from diffexport.engines.manifest import read_manifest
from diffexport.engines.openvino import OpenVINOEngine
from diffexport.export.openvino import export_openvino
from diffexport.recipes import IOSpec


def load_and_call(folder: Path, record: dict, io: IOSpec, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, torch.Tensor]:
    """Seconds to load ``record``'s engine and run ``inputs``; the last output."""
    start = time.perf_counter()
    engine = OpenVINOEngine(folder / record["file"], io, record)
    out = [engine(x, sigma) for x, sigma in inputs][-1]
    return time.perf_counter() - start, out


def interleaved_ms(engines: dict[str, OpenVINOEngine], x: torch.Tensor, sigma: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms per call of each engine, timed in alternating turns."""
    times: dict[str, list[float]] = {k: [] for k in engines}
    for engine in engines.values():
        engine(x, sigma)  # first use imports a static blob
    for _ in range(repeats):
        for key, engine in engines.items():
            time.sleep(0.2)
            engine(x, sigma)  # wake-up call, untimed
            start = time.perf_counter()
            engine(x, sigma)
            engine(x, sigma)
            times[key].append((time.perf_counter() - start) / 2)
    return {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ov-blobs"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    manifest = read_manifest(args.engine_dir)
    io = IOSpec.from_dict(manifest["io"])
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    results = {}
    for key, old in manifest["artifacts"].items():
        if not key.startswith("openvino"):
            continue
        start = time.perf_counter()
        new = export_openvino(args.engine_dir / old["source"], io, args.out / old["file"], precision=old["precision"])
        export_s = time.perf_counter() - start
        batches = sorted(int(b) for b in old.get("static") or {"1": None})
        inputs = [(2 * torch.randn(b, *io.inputs[0].shape[1:], generator=g), torch.linspace(0.1, 10, b)) for b in (batches[0], batches[-1])]
        old_s, old_out = load_and_call(args.engine_dir, old, io, inputs)
        new_s, new_out = load_and_call(args.out, new, io, inputs)
        size = lambda folder, record: sum((folder / f).stat().st_size for f in record["files"]) / 1e6  # noqa: E731
        results[key] = {"export_s": round(export_s, 1), "recorded_MB": round(size(args.engine_dir, old), 1),
                        "now_MB": round(size(args.out, new), 1), "recorded_load_and_calls_s": round(old_s, 2),
                        "now_load_and_calls_s": round(new_s, 2), "batches": [batches[0], batches[-1]],
                        "max_abs_diff": float((old_out - new_out).abs().max())}
        engines = {"recorded": OpenVINOEngine(args.engine_dir / old["file"], io, old), "now": OpenVINOEngine(args.out / new["file"], io, new)}
        results[key]["call_ms"] = {str(b): interleaved_ms(engines, 2 * torch.randn(b, *io.inputs[0].shape[1:], generator=g),
                                                          torch.linspace(0.1, 10, b), args.repeats) for b in batches}
    print(json.dumps({"load_average": os.getloadavg(), **results}, indent=1))


if __name__ == "__main__":
    main()
