"""Measure the per-call D and F errors and the final-sample error per precision, to derive the
presets in ``diffexport/parity/tolerances.py`` (figures in BENCHMARKS.md, section "parity").

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/parity_tolerances.py [--bf16 quickstart ...] [--out DIR]

Builds, with the parity stage off, two seeds of each tiny test recipe (tests/conftest.py, plus
recipes/quickstart.yaml) as fp32 and fp16 ONNX engines, and bf16 AOTInductor engines of the
models named after ``--bf16`` (1-3 min each), then prints the worst errors over the σ sweep.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import TINY_RECIPES  # noqa: E402

from diffexport.engines import build_engine  # noqa: E402
from diffexport.parity.harness import ParityRun  # noqa: E402

BACKEND = {"onnx": "onnxruntime", "aoti": "aoti"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bf16", nargs="*", default=[], help="models to also build as bf16 AOTInductor engines")
    ap.add_argument("--out", type=Path, default=Path("/tmp/parity-tolerances"))
    args = ap.parse_args()
    quick = {**yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text()), "deploy": {}}
    models = {"quickstart": quick, **{k: TINY_RECIPES[k] for k in ("dhariwal", "seed_unet", "conditional")}}
    jobs = [(m, p, "onnx") for m in models for p in ("fp32", "fp16")] + [(m, "bf16", "aoti") for m in args.bf16]
    results = {}
    for name, precision, target in jobs:
        for seed in (0, 1):
            data = copy.deepcopy(models[name])
            data.update(name=f"{name}-{precision}-{seed}", export={"targets": [target], "precision": precision}, parity={"enabled": False})
            data["model"]["init"] = {"seed": 10 + seed}  # every weight redrawn
            recipe = args.out / f"{data['name']}.yaml"
            recipe.parent.mkdir(parents=True, exist_ok=True)
            recipe.write_text(yaml.safe_dump(data))
            engine = build_engine(recipe, args.out / "engines" / data["name"], [target]).engine_dir
            e = ParityRun(engine, rtol_scale=1e9, cache_dir=False, locate=False).check(BACKEND[target])
            if e["error"]:
                raise SystemExit(f"{data['name']}: {e['error']}")
            row = {"D": max(r["rel_l2"] for r in e["per_call"]), "F": max(r["f_rel_l2"] for r in e["per_call"]),
                   "D_at_smallest_sigma": e["per_call"][-1]["rel_l2"], "F_at_smallest_sigma": e["per_call"][-1]["f_rel_l2"],
                   "final": e["trajectory"]["final"]["rel_l2"]}
            results[f"{data['name']}-{target}"] = row
            print(data["name"], target, " ".join(f"{k}={v:.2e}" for k, v in row.items()), flush=True)
    for precision in ("fp32", "fp16", "bf16"):
        rows = [v for k, v in results.items() if f"-{precision}-" in k]
        if rows:
            print(precision, len(rows), "engines, worst:", " ".join(f"{k}={max(r[k] for r in rows):.2e}" for k in rows[0]))
    (args.out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
