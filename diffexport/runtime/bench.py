"""Latency of each backend beside the torch reference: one call, and one whole sample.

Backends are timed round-robin (one call of each in turn, repeated), so drifts in machine load
hit them alike; medians over ``repeats`` after ``warmup`` untimed rounds. ``vs_torch`` is a time
over the torch reference's at the same batch (below 1: faster). FLOPs are counted once per batch
on the reference with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linear layers,
attention products; not normalisations or pointwise ops), so GFLOP/s is the achieved rate of those.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffexport.engines.base import Engine
from diffexport.engines.load import BACKENDS, load
from diffexport.engines.manifest import read_manifest
from diffexport.runtime.batching import clamp_batch
from diffexport.runtime.inputs import index_high, random_call
from diffexport.runtime.sampler import SamplerSpec, sample

REFERENCE = "torch"


def _sync(devices: set[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def round_robin(fns: dict[str, Callable[[], object]], devices: set[torch.device], repeats: int, warmup: int) -> dict[str, float]:
    """Median wall seconds of each ``fns[name]()``, run in turn ``warmup`` untimed then ``repeats`` timed
    rounds; CUDA ``devices`` are synchronised around each timing."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(devices)
            start = time.perf_counter()
            fn()
            _sync(devices)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.no_grad()
def count_flops(reference: Engine, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one reference call on ``inputs`` (FlopCounterMode's count)."""
    with FlopCounterMode(display=False) as counter:
        reference(**inputs)
    return int(counter.get_total_flops())


class _Counting:
    """Counts the rows an engine is called with (to get the number of evaluations of a sample)."""

    def __init__(self, engine: Engine):
        self.engine, self.rows = engine, 0
        self.backend, self.io, self.device = engine.backend, engine.io, engine.device

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.engine(x, sigma, **conditions)


def bench_engine(
    engine_dir: str | Path,
    backends: list[str] | None = None,
    batches: list[int] | None = None,
    *,
    repeats: int = 10,
    warmup: int = 2,
    sample_repeats: int = 1,
    full_sample: bool = True,
    device: str | torch.device | None = None,
    progress: Callable[[str], None] | None = None,
    allow_unverified: bool = False,
) -> dict:
    """Per backend (the torch reference first) and batch: ``call_ms``, ``call_vs_torch``, ``gflops``
    (achieved), and with ``full_sample`` ``sample_s``, ``sample_vs_torch``, ``nfe`` (evaluations
    per sample), ``sample_gflops``. ``backends`` default to every built artifact, ``batches`` to
    the engine's ``opt``; every engine runs on ``device`` (default: where its artifact runs). An
    unverified engine is refused (``UnverifiedEngine``) unless ``allow_unverified``."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    built = [b for b, t in BACKENDS.items() if t in manifest.get("artifacts", {})]
    names = [REFERENCE] + [b for b in (backends or built) if b != REFERENCE]
    engines = {name: _Counting(load(engine_dir, name, device=device, allow_unverified=allow_unverified)) for name in names}
    reference, devices = engines[REFERENCE], {e.device for e in engines.values()}
    spec = SamplerSpec.from_manifest(manifest["sampler"])
    say = progress or (lambda message: None)
    rows: list[dict] = []
    for requested in batches or [int(manifest["io"]["batch"].get("opt", 1))]:
        batch = clamp_batch(reference, requested)
        g = torch.Generator().manual_seed(0)
        inputs = {k: v.to(reference.device) for k, v in random_call(reference, 1.0, batch, g, index_high(reference.engine)).items()}
        flops = count_flops(reference, inputs)
        say(f"batch {batch}: one call of {', '.join(names)}")
        with torch.no_grad():
            calls = round_robin({n: (lambda e=e: e(**{k: v.to(e.device) for k, v in inputs.items()})) for n, e in engines.items()},
                                devices, repeats, warmup)
        rows += [{"backend": n, "batch": batch, "call_ms": calls[n] * 1e3, "gflop_per_call": flops / 1e9,
                  "gflops": flops / calls[n] / 1e9} for n in names]
        if full_sample:
            say(f"batch {batch}: full samples ({spec.solver}, {spec.num_steps} steps) of {', '.join(names)}")
            for e in engines.values():
                e.rows = 0
            runs = round_robin({n: (lambda e=e: sample(e, spec, batch=batch, seed=0)) for n, e in engines.items()},
                               devices, sample_repeats, 0)
            for row in rows[-len(names):]:
                nfe = engines[row["backend"]].rows // (batch * sample_repeats)
                row.update(sample_s=runs[row["backend"]], nfe=nfe, sample_gflops=flops * nfe / runs[row["backend"]] / 1e9)
    _ratios(rows)
    return {"engine": manifest["name"], "device": str(device or "default"), "repeats": repeats, "warmup": warmup,
            "sample_repeats": sample_repeats, "solver": spec.solver, "num_steps": spec.num_steps,
            "load_average": os.getloadavg()[0], "rows": rows}


def _ratios(rows: list[dict]) -> None:
    """``call_vs_torch`` and ``sample_vs_torch``: each row's time over the reference's at its batch."""
    ref = {r["batch"]: r for r in rows if r["backend"] == REFERENCE}
    for r in rows:
        base = ref.get(r["batch"])
        r["call_vs_torch"] = r["call_ms"] / base["call_ms"] if base else None
        if "sample_s" in r:
            r["sample_vs_torch"] = r["sample_s"] / base["sample_s"] if base and base.get("sample_s") else None
