"""Sampling benchmark through the command line: build fp32 and bf16 engines, then `diffexport bench`
and the parity reports of their builds.

    .venv/bin/python benchmarks/bench_sampling.py [recipes/edm-cifar10-ddpmpp.yaml] [--out bench-out]
        [--targets onnx,aoti] [--bf16-targets aoti] [--repeats 10] [--skip-build] [--no-bf16]

Figures (EDM CIFAR-10 DDPM++, 55.7 M parameters, 2-core CPU): per-call latency of each backend over
the torch reference at batch 1 and 8; one 18-step Heun sample (35 evaluations) at batch 1: eager
about 13 s, fp32 floor about 7.8 s, targets <= 9 s (fp32) and <= 6 s (bf16 engine); the parity
(per-call and final relative L2) of every backend of both engines, as their builds measured it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

CLI = [str(Path(sys.executable).with_name("diffexport"))]


def run(*args: str) -> None:
    print("$ diffexport " + " ".join(args), flush=True)
    done = subprocess.run(CLI + list(args))
    if done.returncode not in (0,):
        print(f"  (exit code {done.returncode})", flush=True)


def variant(recipe: Path, out: Path, precision: str) -> Path:
    """``recipe`` with ``export.precision`` set (and a name saying so), written into ``out``."""
    data = yaml.safe_load(recipe.read_text())
    if precision != data.get("export", {}).get("precision", "fp32"):
        data["name"] = f"{data['name']}-{precision}"
    data.setdefault("export", {})["precision"] = precision
    data["deploy"] = {}
    path = out / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bench(engine: Path, out: Path, tag: str, batches: list[int], sample: bool, repeats: int) -> dict:
    path = out / f"bench-{tag}.json"
    args = ["bench", str(engine), *[f"--batch={b}" for b in batches], "--repeats", str(repeats), "--json", str(path)]
    run(*args, *(["--sample-repeats", "3"] if sample else ["--no-sample"]))
    return json.loads(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=Path("recipes/edm-cifar10-ddpmpp.yaml"))
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--targets", default="onnx,aoti", help="targets of the fp32 engine")
    parser.add_argument("--bf16-targets", default="aoti", help="targets of the bf16 engine (bf16 ONNX needs Conv-22: opset >= 22)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-build", action="store_true", help="reuse the engines already in --out")
    parser.add_argument("--no-bf16", action="store_true")
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    precisions = ["fp32"] + ([] if a.no_bf16 else ["bf16"])
    engines = {}
    for precision in precisions:
        recipe = variant(a.recipe, a.out, precision)
        engines[precision] = a.out / recipe.stem
        if not a.skip_build:
            targets = a.targets if precision == "fp32" else a.bf16_targets
            run("build", str(recipe), "--out", str(engines[precision]), "--targets", targets)
    summary = {"load_average_start": os.getloadavg()[0], "calls": {}, "samples": {}, "parity": {}}
    summary["calls"]["fp32"] = bench(engines["fp32"], a.out, "fp32-calls", [1, 8], False, a.repeats)
    for precision, engine in engines.items():
        summary["samples"][precision] = bench(engine, a.out, f"{precision}-sample", [1], True, 3)
        summary["parity"][precision] = json.loads((engine / "manifest.json").read_text()).get("parity")
    summary["load_average_end"] = os.getloadavg()[0]
    (a.out / "bench_sampling.json").write_text(json.dumps(summary, indent=2))

    print("\nper call, fp32 engine (median ms; time over torch):")
    for r in summary["calls"]["fp32"]["rows"]:
        print(f"  {r['backend']:<12} batch {r['batch']:>2}: {r['call_ms']:9.1f} ms  {r['call_vs_torch']:.2f}x  {r['gflops']:6.1f} GFLOP/s")
    print("one sample at batch 1 (Heun x 18, seconds):")
    for precision, result in summary["samples"].items():
        for r in result["rows"]:
            print(f"  {precision} engine, {r['backend']:<12}: {r['sample_s']:6.2f} s  ({r['nfe']} evaluations, {r['sample_vs_torch']:.2f}x torch)")
    print("parity (relative L2 against the fp32 torch reference):")
    for precision, p in summary["parity"].items():
        for backend, b in ((p or {}).get("backends") or {}).items():
            print(f"  {precision} {backend:<12}: per call {b['per_call_rel_l2']}, final {b['final_rel_l2']}, passed {b['passed']}")
    print(f"(1-min load average {summary['load_average_start']:.1f} -> {summary['load_average_end']:.1f}; other processes skew timings)")


if __name__ == "__main__":
    main()
