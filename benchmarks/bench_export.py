"""Export benchmark: time per build stage, then per-call latency of ONNX Runtime and AOTInductor
beside eager torch, measured side by side (round-robin, medians after warm-up) in one run.

    .venv/bin/python benchmarks/bench_export.py [recipes/edm-cifar10-ddpmpp.yaml] [--batch 1 8]
        [--precision fp32] [--opset 21] [--no-aoti] [--inductor-configs JSON] [--rounds 20] [--json out.json]

Targets (EDM CIFAR-10 DDPM++, 55.7 M parameters, 2-core CPU): build <= 60 s; ORT per call <=
0.62x eager at batch 1. FLOPs per call are counted so the achieved GFLOP/s can be compared with
the machine's fp32 matmul ceiling (docs: /work/shared/ENVIRONMENT.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffexport.engines.onnxruntime import OnnxRuntimeEngine
from diffexport.export import build_denoiser, example_inputs, export_aoti, export_onnx, export_program
from diffexport.recipes import io_spec, load_recipe


def timed(stages: dict, name: str, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    stages[name] = round(time.perf_counter() - t, 2)
    print(f"  {name:<16} {stages[name]:7.2f} s", flush=True)
    return out


def side_by_side(fns: dict, args: tuple, rounds: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so load drifts hit all alike."""
    times = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn(*args)
        for _ in range(rounds):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn(*args)
                times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", default="recipes/edm-cifar10-ddpmpp.yaml")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--opset", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="threads of every backend (default: ORT physical cores, torch its own)")
    parser.add_argument("--spinning", action="store_true", help="let ONNX Runtime's threads spin between calls")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-aoti", action="store_true", help="skip the AOTInductor compile (minutes on 2 cores)")
    parser.add_argument("--inductor-configs", type=json.loads, default=None, help='JSON overrides, e.g. \'{"freezing": false}\'')
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = parser.parse_args()

    if a.threads:
        torch.set_num_threads(a.threads)  # eager and the AOTInductor kernels (OpenMP)
    recipe = load_recipe(a.recipe)
    io = io_spec(recipe)
    with tempfile.TemporaryDirectory(prefix="bench_export.") as tmp:
        summary = run(recipe, io, Path(tmp), a)
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2))


def run(recipe, io, out_dir: Path, a: argparse.Namespace) -> dict:
    stages: dict[str, float] = {}
    load_before = os.getloadavg()[0]
    print(f"{recipe.name}: stages (1-min load average {load_before:.1f}; other processes skew every timing)", flush=True)
    denoiser = timed(stages, "load", build_denoiser, recipe)
    program = timed(stages, "export:program", export_program, denoiser, io, a.precision)
    timed(stages, "export:onnx", export_onnx, program, io, out_dir / "denoiser.onnx", precision=a.precision, opset=a.opset)
    if not a.no_aoti:
        timed(stages, "export:aoti", export_aoti, program, io, out_dir / "denoiser.pt2", precision=a.precision,
              inductor_configs=a.inductor_configs)
    stages["build (program+onnx)"] = round(stages["export:program"] + stages["export:onnx"], 2)
    params = sum(p.numel() for p in denoiser.parameters())

    backends = {"eager": denoiser, "onnxruntime": OnnxRuntimeEngine(out_dir / "denoiser.onnx", io, threads=a.threads, spinning=a.spinning)}
    if not a.no_aoti:
        runner = torch._inductor.aoti_load_package(str(out_dir / "denoiser.pt2"))
        backends["aoti"] = lambda *args: runner(*args)
    results = []
    print(f"\n{'backend':<12} {'batch':>5} {'ms/call':>9} {'x eager':>8} {'GFLOP/s':>8} {'rel err':>9}", flush=True)
    for batch in a.batch:
        args = example_inputs(io, batch, seed=batch)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            reference = denoiser(*args)
        flops = counter.get_total_flops()
        medians = side_by_side(backends, args, a.rounds)
        for name, fn in backends.items():
            with torch.no_grad():
                out = fn(*args)
            out = out[0] if isinstance(out, (list, tuple)) else out
            err = float((out - reference).norm() / reference.norm())
            row = dict(backend=name, batch=batch, ms=1e3 * medians[name], ratio=medians[name] / medians["eager"],
                       gflops=flops / medians[name] / 1e9, rel_err=err)  # fmt: skip
            results.append(row)
            print(f"{name:<12} {batch:>5} {row['ms']:9.2f} {row['ratio']:8.2f} {row['gflops']:8.1f} {err:9.1e}", flush=True)
    summary = dict(recipe=recipe.name, params=params, precision=a.precision, opset=a.opset, stages=stages, latency=results,
                   torch=torch.__version__, threads=torch.get_num_threads(), load=[load_before, os.getloadavg()[0]])  # fmt: skip
    print(f"\nstages {json.dumps(stages)}; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    return summary


if __name__ == "__main__":
    main()
