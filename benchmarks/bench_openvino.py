"""Issue 10 benchmark: every CPU engine of a recipe, fp32 and bf16, beside the torch reference.

    .venv/bin/python benchmarks/bench_openvino.py [recipes/edm-cifar10-ddpmpp.yaml] [--out bench-out/openvino]
        [--repeats 5] [--skip-build] [--parity BACKEND ...]

1. builds the recipe with ``targets: [onnx, aoti, openvino], precision: fp32`` (the issue's fp32
   export), then with ``export.targets: auto, precision: auto`` (onnx, aoti, openvino and the
   aoti-bf16 / openvino-bf16 candidates; TensorRT is skipped without a GPU), both without the
   parity and rank stages, and reports the stage times and each export's wall clock (after the
   load stage; the AOTI stages overlap the others: they compile in worker processes);
2. ``diffexport parity`` on the ``--parity`` backends (default: the OpenVINO and bf16 ones), report
   in ``OUT/parity``;
3. ``diffexport bench`` at batch 1 and 8 (per call and per full sample, interleaved, 0.3 s pauses)
   with ``OMP_WAIT_POLICY`` unset (``PASSIVE`` slows torch eager by 25-35 % at batch 1 and flatters
   the engines' ratios; see ``diffexport/runtime/bench.py``); ``OUT/bench.json``.

Goals (issue 10): at batch 1 and 8, best fp32 engine <= 0.55x and best bf16 <= 0.30x torch, bf16
parity inside its tolerance; fp32 export <= 60 s. Compare ratios: absolute times move with load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

CLI = [str(Path(sys.executable).with_name("diffexport"))]
ENV = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # OpenMP's default policy: a fair reference


def run(*args: str) -> int:
    print("$ diffexport " + " ".join(args), flush=True)
    return subprocess.run(CLI + list(args), env=ENV).returncode


def build(recipe: Path, out: Path, targets: str | list[str] = "auto", precision: str = "auto") -> dict:
    """Build ``recipe`` with ``targets`` / ``precision`` into ``out`` (no parity, no ranking)."""
    from diffexport.engines import build_engine
    from diffexport.recipes import parse_recipe

    data = yaml.safe_load(recipe.read_text())
    data["export"] = {**data.get("export", {}), "targets": targets, "precision": precision}
    data["deploy"] = {}
    spec = parse_recipe(data, str(recipe))
    spec._source = recipe.resolve()
    load_avg = os.getloadavg()[0]
    result = build_engine(spec, out, force=True, progress=lambda stage, event, s, detail: event != "start" and print(f"  {stage:<22} {event} {s:7.1f} s {detail}", flush=True))
    stages = result.manifest["stages"]
    return {"stages": stages, "export_wall_s": round(result.seconds - stages["load"], 1), "load_average": load_avg,
            "artifacts": {k: {"precision": v["precision"], "bytes": v["bytes"]} for k, v in result.manifest["artifacts"].items()},
            "skipped": result.manifest["skipped"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=Path("recipes/edm-cifar10-ddpmpp.yaml"))
    parser.add_argument("--out", type=Path, default=Path("bench-out/openvino"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--parity", nargs="*", default=["openvino", "openvino-bf16", "aoti-bf16"])
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    engine = a.out / "engine"
    summary: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "recipe": str(a.recipe)}
    if not a.skip_build:
        summary["fp32_build"] = build(a.recipe, a.out / "engine-fp32", ["onnx", "aoti", "openvino"], "fp32")
        print(f"fp32 export (torch.export + onnx + aoti + openvino), wall clock: {summary['fp32_build']['export_wall_s']} s", flush=True)
        summary["build"] = build(a.recipe, engine)
        print(f"auto export (every candidate), wall clock: {summary['build']['export_wall_s']} s", flush=True)
    if a.parity:
        run("parity", str(engine), *[f"--backend={b}" for b in a.parity], "--report", str(a.out / "parity"))
    if (a.out / "parity" / "parity.json").is_file():
        parity = json.loads((a.out / "parity" / "parity.json").read_text())
        summary["parity"] = {b: {"passed": e["passed"], "per_call": e.get("per_call_worst", {}).get("rel_l2"),
                                 "final": e.get("trajectory", {}).get("final", {}).get("rel_l2"), "tolerances": e["tolerances"]}
                             for b, e in parity["backends"].items()}
    run("bench", str(engine), "--batch", "1", "--batch", "8", "--repeats", str(a.repeats), "--warmup", "1", "--json", str(a.out / "bench.json"),
        "--allow-unverified")  # built without the parity stage: parity of the candidates is step 2
    summary["bench"] = json.loads((a.out / "bench.json").read_text())
    from diffexport.engines.manifest import versions

    summary["versions"] = {**versions(), "openvino": __import__("openvino").get_version()}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n| backend | precision | batch | call ms | call vs torch | GFLOP/s | % peak | sample s | sample vs torch | loop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in summary["bench"]["rows"]:
        print(f"| {r['backend']} | {r['precision']} | {r['batch']} | {r['call_ms']:.1f} | {r['call_vs_torch']:.2f}x | {r['gflops']:.0f} | "
              f"{r['pct_peak']:.0f} | {r['sample_s']:.2f} | {r['sample_vs_torch']:.2f}x | {100 * r['loop_overhead']:.1f}% |")
    b = summary["bench"]
    print(f"peak {b['peak_gflops']}, load average {b['load_average']} -> {b['load_average_after']} on {b['cores']} cores, "
          f"meanwhile other processes {b['others_cpus']} CPUs, steal {b['steal_cpus']}; {b['warning']}")


if __name__ == "__main__":
    main()
