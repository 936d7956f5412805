"""Measure the shipped digits model for BENCHMARKS.md: engines per precision, task parity, CFG sweep.

    PYTHONPATH=. python examples/digits_report.py [--work /tmp/digits-report] [--skip-build]

Builds, from ``recipes/quickstart.yaml``: fp32 (ONNX + AOTInductor, as shipped), fp16 (ONNX) and
bf16 (AOTInductor; ONNX Runtime's CPU provider has no bf16 Conv). Each build's parity stage writes
``parity.md`` / ``parity.json`` with task parity (agreement with the fp32 torch reference, judge
accuracy, Fréchet distances). Then: a sample grid PNG per backend and precision (``docs/``), judge
accuracy and Fréchet distance to real digits against the guidance scale (torch reference), and the
Fréchet distance between two sets of *real* digits for scale. Writes ``<work>/digits_report.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from diffexport.engines.load import load
from diffexport.engines.manifest import read_manifest
from diffexport.parity.digits import load_digits16
from diffexport.parity.task import frechet_distance, judge_samples, requested, resolve_judge
from diffexport.runtime.images import save_png_grid
from diffexport.runtime.sampler import sample

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"fp32": ["onnx", "aoti"], "fp16": ["onnx"], "bf16": ["aoti"]}
BACKEND = {"onnx": "onnxruntime", "aoti": "aoti"}


def variant_recipe(work: Path, precision: str, targets: list[str]) -> Path:
    data = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    data["model"]["checkpoint"] = str((REPO / "recipes" / data["model"]["checkpoint"]).resolve())
    data["export"].update(precision=precision, targets=targets)
    data.update(name=f"quickstart-{precision}", deploy={})
    path = work / f"quickstart-{precision}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/digits-report"))
    ap.add_argument("--skip-build", action="store_true")
    ap.add_argument("--samples", type=int, default=100)
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    out: dict = {"builds": {}, "task": {}, "cfg_sweep": [], "samples_png": {}}
    judge = resolve_judge("digits")
    real_test = judge_samples(judge, load_digits16("test")[0])[1]
    real_train = judge_samples(judge, load_digits16("train")[0])[1]
    rng = np.random.default_rng(0)
    out["frechet_real_vs_real"] = {
        "train_all_vs_test": frechet_distance(real_train, real_test),
        "train_100_vs_test": [frechet_distance(real_train[rng.choice(len(real_train), 100, replace=False)], real_test) for _ in range(5)],
    }
    print(json.dumps(out["frechet_real_vs_real"]), flush=True)
    for precision, targets in VARIANTS.items():
        engine_dir = args.work / f"quickstart-{precision}"
        if not args.skip_build:  # the CLI build, parity stage included, as a user runs it
            start = time.perf_counter()
            cli = [sys.executable, "-c", "from diffexport.cli import main; main()"]
            done = subprocess.run([*cli, "build", str(variant_recipe(args.work, precision, targets)), "--out", str(engine_dir), "--force"],
                                  capture_output=True, text=True)
            print(done.stdout[-2000:], done.stderr[-2000:], flush=True)
            out["builds"][precision] = {"seconds": round(time.perf_counter() - start, 1), "exit_code": done.returncode}
        report = json.loads((engine_dir / "parity.json").read_text())
        out["task"][precision] = {"reference": report["task"]["reference"],
                                  **{b: {**e["task"], "final_rel_l2": e["trajectory"]["final"]["rel_l2"]} for b, e in report["backends"].items()}}
        manifest = read_manifest(engine_dir)
        out["builds"].setdefault(precision, {})["stages"] = manifest.get("timings", manifest.get("stages"))
        for target in targets:
            engine = load(engine_dir, BACKEND[target])
            conditions, _ = requested(engine, args.samples)
            x = sample(engine, manifest["sampler"], batch=args.samples, seed=0, conditions=conditions)
            png = save_png_grid(x.cpu().numpy(), REPO / "docs" / f"digits_samples_{BACKEND[target]}_{precision}.png")
            out["samples_png"][f"{BACKEND[target]}_{precision}"] = str(png.relative_to(REPO))
        print(json.dumps(out["task"][precision]), flush=True)
    reference = load(args.work / "quickstart-fp32", "torch")
    manifest = read_manifest(args.work / "quickstart-fp32")
    conditions, want = requested(reference, args.samples)
    for w in (0.0, 1.0, 1.5, 2.0, 3.0, 4.0):
        start = time.perf_counter()
        x = sample(reference, manifest["sampler"], batch=args.samples, seed=0, conditions=conditions, guidance=w)
        labels, feats = judge_samples(judge, x)
        row = {"cfg": w, "accuracy": float((labels == want).mean()), "frechet_real": frechet_distance(real_test, feats),
               "seconds": round(time.perf_counter() - start, 1)}
        out["cfg_sweep"].append(row)
        print(json.dumps(row), flush=True)
        if w == 1.0:
            save_png_grid(x.cpu().numpy(), REPO / "docs" / "digits_samples_cfg1.png")
    (args.work / "digits_report.json").write_text(json.dumps(out, indent=1))
    print(f"wrote {args.work / 'digits_report.json'}")


if __name__ == "__main__":
    main()
