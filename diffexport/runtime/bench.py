"""Latency of each backend beside the torch reference, and the ranking of a ``targets: auto`` build.

Backends are timed round-robin (a few back-to-back calls of each in turn, repeated, with a pause
between runners so that one runtime's spinning threads do not slow the next), so drifts in machine
load hit them alike. After each pause one untimed call wakes the runner up, then the next
:data:`BLOCK` calls are timed one by one, as a sampler calls the engine: a lone call after a pause
measured up to 1.3x slower (torch eager, EDM CIFAR-10, batch 1) than the calls that follow it.
Medians over ``repeats`` timed calls after ``warmup`` untimed rounds. ``vs_torch`` is a time over
the torch reference's in the same run (below 1: faster). FLOPs are counted once per batch on the
reference with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linear layers, attention
products; not normalisations or pointwise ops); ``pct_peak`` compares the achieved rate with the
best dense kernel of the backend's precision measured on the spot (:func:`peak_gflops`).

Leave ``OMP_WAIT_POLICY`` unset (OpenMP's default: idle threads spin briefly, then sleep). With
``PASSIVE`` every op of an OpenMP runner (torch eager, AOTInductor) wakes sleeping threads: on 2 KVM
cores torch eager ran EDM CIFAR-10 25-35 % slower at batch 1 (280 vs 215 ms) and the tiny quickstart
4-6x slower, which flatters every other backend's ratio; ONNX Runtime and OpenVINO (their own thread
pools) timed the same under both, so the pause between runners is what keeps one runner's threads
from slowing the next. ``ACTIVE`` spins forever and does slow the next runner. The result records
the policy and warns when it is set.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffexport.engines.base import Engine
from diffexport.engines.load import BACKENDS, load
from diffexport.engines.manifest import read_manifest
from diffexport.engines.verdict import verdict
from diffexport.runtime.batching import clamp_batch
from diffexport.runtime.inputs import index_high, random_call, random_conditions
from diffexport.runtime.sampler import SamplerSpec, image_shape, sample

REFERENCE = "torch"
BATCHES = (1, 8)
PAUSE_S = 0.3  # between runners: lets OpenMP workers of the previous one go to sleep
BLOCK = 3  # timed calls in a row per runner and round (after one untimed wake-up call)
WAIT_POLICY_NOTES = {
    "PASSIVE": "OMP_WAIT_POLICY=PASSIVE slows torch eager and AOTInductor (every op wakes sleeping OpenMP threads; "
               "EDM CIFAR-10 torch eager +25-35 % at batch 1), which flatters the other backends' ratios: unset it",
    "ACTIVE": "OMP_WAIT_POLICY=ACTIVE: idle OpenMP threads spin and slow the runner after them: unset it",
}
IDLE_WINDOW_S = 0.5  # how long the machine is watched before a benchmark for other processes' CPU use


def _sync(devices: set[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def round_robin(fns: dict[str, Callable[[], object]], devices: set[torch.device], repeats: int, warmup: int,
                pause: float = PAUSE_S, block: int = 1) -> dict[str, float]:
    """Median wall seconds of each ``fns[name]()`` over ``repeats`` timed calls, after ``warmup``
    untimed rounds. Runners take turns: ``pause`` seconds of sleep, then (when ``block`` > 1) one
    untimed call and ``block`` timed calls in a row; CUDA ``devices`` synchronised around timings."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(math.ceil(repeats / block)):
        for name, fn in fns.items():
            if pause and len(fns) > 1:
                time.sleep(pause)
            if block > 1:
                fn()
            for _ in range(min(block, repeats - len(times[name]))):
                _sync(devices)
                start = time.perf_counter()
                fn()
                _sync(devices)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine_load(window: float = IDLE_WINDOW_S) -> dict:
    """``{"load_average", "others_cpus", "cores", "warning"}`` before a benchmark: the 1-minute load
    average (recorded only: it still counts work that just ended, such as the build stages before
    the rank stage), the CPUs' worth used by other processes and the hypervisor over the next
    ``window`` seconds (this process sleeps meanwhile), the CPUs this process may use, and a warning
    line when that share is above :data:`OTHERS` (``None`` otherwise)."""
    load1, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    share = CpuShare()
    time.sleep(window)
    now = share.stop()
    warning = None
    if now["warning"]:
        warning = (f"the machine is busy ({now['others_cpus']:.2f} CPUs of other processes, {now['steal_cpus']:.2f} stolen by the "
                   f"hypervisor, load average {load1:.2f} on {cores} cores): timings are noisy; compare ratios, not times")
    if note := WAIT_POLICY_NOTES.get(os.environ.get("OMP_WAIT_POLICY", "").upper()):
        warning = f"{warning}; {note}" if warning else note
    return {"load_average": round(load1, 2), "others_cpus": now["others_cpus"], "cores": cores, "warning": warning}


OTHERS = 0.25  # CPUs' worth of other processes' (or the hypervisor's steal) time during a bench that makes it noisy


class CpuShare:
    """What else used the CPUs while a benchmark ran: other processes' CPU time (``/proc/stat``'s busy
    time minus this process's own) and the hypervisor's steal time, each in CPUs' worth over the
    wall time. The load average cannot tell: the benchmark's own threads raise it to ~1 per core."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float, float] | None:
        """``(wall, all processes' busy CPU s, steal s, this process's CPU s)``; ``None`` without /proc/stat."""
        try:
            with open("/proc/stat") as f:
                user, nice, system, _, _, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        tick, own = os.sysconf("SC_CLK_TCK"), resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), (user + nice + system + irq + softirq) / tick, steal / tick, own.ru_utime + own.ru_stime

    def stop(self) -> dict:
        """``{"others_cpus", "steal_cpus", "warning"}`` since construction (``None``s where unreadable)."""
        end = self._read()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return {"others_cpus": None, "steal_cpus": None, "warning": None}
        wall, busy, steal, own = (b - a for a, b in zip(self.start, end))
        others, stolen = max(busy - own, 0.0) / wall, steal / wall
        warning = None
        if others > OTHERS or stolen > OTHERS:
            warning = (f"other work used the CPUs during the benchmark ({others:.2f} CPUs of other processes, {stolen:.2f} stolen by "
                       "the hypervisor): timings are noisy; compare ratios, not times")
        return {"others_cpus": round(others, 3), "steal_cpus": round(stolen, 3), "warning": warning}


def peak_gflops(n: int = 1024, seconds: float = 0.3) -> dict[str, float]:
    """The best GFLOP/s in fp32 and bf16 (CPU, this process's threads) of two dense kernels, each
    repeated for about ``seconds``: an ``n``×``n`` matmul, and a 3×3 convolution of 256 channels at
    32×32 (oneDNN: torch's fp32 matmul goes to MKL, which on AMD CPUs ran at half the rate of the
    AVX-512 convolutions). ``pct_peak`` refers to this."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        x, w = torch.randn(1, 256, 32, 32, dtype=dtype), torch.randn(256, 256, 3, 3, dtype=dtype)
        kernels = ((lambda: torch.mm(a, b), 2 * n**3), (lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * 256 * 256 * 9 * 32 * 32))
        out[name] = max(flops / _best_seconds(fn, seconds) / 1e9 for fn, flops in kernels)
    return out


def _best_seconds(fn: Callable[[], object], seconds: float) -> float:
    """The fastest of repeated ``fn()`` calls over about ``seconds`` (after one untimed call)."""
    fn()
    best, end = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < end or best == math.inf:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def count_flops(reference: Engine, inputs: dict[str, torch.Tensor]) -> int:
    """FLOPs of one reference call on ``inputs`` (FlopCounterMode's count)."""
    with FlopCounterMode(display=False) as counter:
        reference(**inputs)
    return int(counter.get_total_flops())


class _Counting:
    """Counts the rows an engine is called with (the number of evaluations of a sample) and the
    seconds spent inside its calls (the rest of a sample's time is the sampler loop's). The calls
    of a sample need not be at its batch: classifier-free guidance calls the engine with 2B rows."""

    def __init__(self, engine: Engine):
        self.engine, self.rows, self.seconds = engine, 0, 0.0
        self.backend, self.io, self.device = engine.backend, engine.io, engine.device

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        _sync({self.device})
        start = time.perf_counter()
        out = self.engine(x, sigma, **conditions)
        _sync({self.device})
        self.seconds += time.perf_counter() - start
        return out


class _Null:
    """An engine of ``like``'s I/O whose call costs nothing (returns ``x`` scaled): timing a sample
    with it measures the sampler's own work (solver math, guards, chunking, Python)."""

    backend = "null"

    def __init__(self, like: Engine):
        self.io, self.device = like.io, like.device

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def sampler_only(like: Engine, spec: SamplerSpec, batch: int, repeats: int = 3, conditions: dict[str, torch.Tensor] | None = None) -> float:
    """Median seconds of one whole sample at ``batch`` with a zero-cost engine (:class:`_Null`)."""
    null = _Null(like)
    return round_robin({"null": lambda: sample(null, spec, batch=batch, seed=0, conditions=conditions)}, {like.device}, repeats, 1, pause=0)["null"]


def sample_conditions(reference: Engine, spec: SamplerSpec, batch: int) -> dict[str, torch.Tensor]:
    """Seeded condition inputs of one whole sample at ``batch`` (image conditions at the full image size under patching)."""
    _, h, w = image_shape(reference, spec)
    g = torch.Generator().manual_seed(0)
    return random_conditions(reference, batch, g, index_high(getattr(reference, "engine", reference)), (h, w) if spec.patching else None)


def precision_of(manifest: dict, backend: str) -> str:
    """The precision ``backend`` runs at (``fp32`` for the torch reference)."""
    target = BACKENDS.get(backend)
    return manifest.get("artifacts", {}).get(target, {}).get("precision", "fp32") if target else "fp32"


def built_backends(manifest: dict) -> list[str]:
    """The backends of the artifacts ``manifest`` lists, in :data:`BACKENDS` order."""
    return [b for b, t in BACKENDS.items() if t is not None and t in manifest.get("artifacts", {})]


def _call_inputs(reference: Engine, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    high = index_high(getattr(reference, "engine", reference))
    return {k: v.to(reference.device) for k, v in random_call(reference, 1.0, batch, g, high).items()}


def time_calls(engines: dict[str, Engine], inputs: dict[str, torch.Tensor], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds of one call of each engine on ``inputs``, round-robin (:func:`round_robin`)."""
    devices = {e.device for e in engines.values()}
    with torch.no_grad():
        return round_robin({n: (lambda e=e: e(**{k: v.to(e.device) for k, v in inputs.items()})) for n, e in engines.items()},
                           devices, repeats, warmup, block=BLOCK)


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
    """Per backend (the torch reference first) and batch: ``precision``, ``call_ms``, ``call_vs_torch``,
    ``gflops`` (achieved) and ``pct_peak``; with ``full_sample`` also ``sample_s``, ``sample_vs_torch``,
    ``nfe`` (evaluations per sample), ``sample_gflops``, ``loop_overhead`` (the share of the sample
    time spent outside the engine's calls, timed around each call: sampler work, copies, guards) and
    ``sampler_only_s`` (one sample with a zero-cost engine: the sampler's own work).
    ``backends`` default to every built artifact that passed parity (all with ``allow_unverified``; those left out
    are listed under ``skipped``), ``batches`` to 1 and 8 (clamped to the engine's
    range); every engine runs on ``device`` (default: where its artifact runs). The result also holds
    the machine's load before (:func:`machine_load`), what else used the CPUs meanwhile
    (:class:`CpuShare`: ``others_cpus``, ``steal_cpus``) and the measured ``peak_gflops``."""
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    before, share = machine_load(), CpuShare()
    skipped: dict[str, str] = {}
    if backends is None and not allow_unverified:  # every verified one: a targets: auto candidate that failed parity stays out
        built = built_backends(manifest)
        skipped = {b: why for b in built if (why := verdict(manifest, b)[1])}
        backends = [b for b in built if b not in skipped] or built[:1]  # none verified: load refuses the first, with its line
        skipped = {b: why for b, why in skipped.items() if b not in backends}
    names = [REFERENCE] + [b for b in (backends or built_backends(manifest)) if b != REFERENCE]
    engines = {name: _Counting(load(engine_dir, name, device=device, allow_unverified=allow_unverified)) for name in names}
    reference = engines[REFERENCE]
    spec = SamplerSpec.from_manifest(manifest["sampler"])
    say = progress or (lambda message: None)
    cpu = all(e.device.type == "cpu" for e in engines.values())
    say("measuring the matmul peak")
    peak = peak_gflops() if cpu else {}
    rows: list[dict] = []
    for batch in dict.fromkeys(clamp_batch(reference, b) for b in (batches or BATCHES)):
        inputs = _call_inputs(reference, batch)
        flops = count_flops(reference, inputs)
        say(f"batch {batch}: one call of {', '.join(names)}")
        calls = time_calls(engines, inputs, repeats, warmup)
        for n in names:
            precision = precision_of(manifest, n)
            gflops = flops / calls[n] / 1e9
            rows.append({"backend": n, "precision": precision, "batch": batch, "call_ms": calls[n] * 1e3, "gflop_per_call": flops / 1e9,
                         "gflops": gflops, "pct_peak": 100 * gflops / peak[precision] if precision in peak else None})
        if full_sample:
            say(f"batch {batch}: full samples ({spec.solver}, {spec.num_steps} steps) of {', '.join(names)}")
            for e in engines.values():
                e.rows, e.seconds = 0, 0.0
            conds = sample_conditions(reference, spec, batch)
            runs = round_robin({n: (lambda e=e: sample(e, spec, batch=batch, seed=0, conditions=conds)) for n, e in engines.items()},
                               {e.device for e in engines.values()}, sample_repeats, 0)
            alone = sampler_only(reference, spec, batch, conditions=conds)
            for row in rows[-len(names):]:
                n = row["backend"]
                nfe = engines[n].rows // (batch * sample_repeats)
                in_engine = engines[n].seconds / sample_repeats
                row.update(sample_s=runs[n], nfe=nfe, sample_gflops=flops * nfe / runs[n] / 1e9,
                           loop_overhead=(runs[n] - in_engine) / runs[n], sampler_only_s=alone)
    _ratios(rows)
    after, during = machine_load(), share.stop()
    return {"engine": manifest["name"], "skipped": skipped, "device": str(device or "default"), "repeats": repeats, "warmup": warmup,
            "sample_repeats": sample_repeats, "solver": spec.solver, "num_steps": spec.num_steps, "pause_s": PAUSE_S, "block": BLOCK,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "threads": torch.get_num_threads(),
            "load_average": before["load_average"], "load_average_after": after["load_average"], "cores": before["cores"],
            "others_cpus": during["others_cpus"], "steal_cpus": during["steal_cpus"],
            "warning": "; ".join(w for w in (before["warning"], during["warning"]) if w) or None, "peak_gflops": peak, "rows": rows}


def _ratios(rows: list[dict]) -> None:
    """``call_vs_torch`` and ``sample_vs_torch``: each row's time over the reference's at its batch."""
    ref = {r["batch"]: r for r in rows if r["backend"] == REFERENCE}
    for r in rows:
        base = ref.get(r["batch"])
        r["call_vs_torch"] = r["call_ms"] / base["call_ms"] if base else None
        if "sample_s" in r:
            r["sample_vs_torch"] = r["sample_s"] / base["sample_s"] if base and base.get("sample_s") else None


def rank_backends(engine_dir: str | Path, backends: list[str], batches: list[int], *, repeats: int = 2, warmup: int = 0) -> dict:
    """Time ``repeats`` back-to-back calls of each of ``backends`` at each of ``batches`` (round-robin,
    :func:`time_calls`: the untimed wake-up call of each turn is the warm-up; one timed call at the
    largest of several batches, whose calls take seconds: EDM CIFAR-10 at 64 took 4-11 s) and rank
    them by the geometric mean over batches of time / the fastest time at that batch (1.0: fastest
    everywhere).

    Returns ``{"batches", "repeats", "load_average", "others_cpus", "warning", "order", "candidates": {backend:
    {"precision", "call_ms": {batch: ms}, "score"}}}``, ``order`` fastest first.
    """
    engine_dir = Path(engine_dir)
    manifest = read_manifest(engine_dir)
    load_info, share = machine_load(), CpuShare()
    engines = {b: load(engine_dir, b, allow_unverified=True) for b in backends}
    first = next(iter(engines.values()))
    times: dict[str, dict[int, float]] = {b: {} for b in backends}
    sizes = list(dict.fromkeys(clamp_batch(first, b) for b in batches))
    for batch in sizes:
        n = 1 if len(sizes) > 1 and batch == max(sizes) else repeats
        for b, seconds in time_calls(engines, _call_inputs(first, batch), n, warmup).items():
            times[b][batch] = seconds
    best = {batch: min(t[batch] for t in times.values()) for batch in next(iter(times.values()))}
    score = {b: math.exp(statistics.fmean(math.log(t[k] / best[k]) for k in t)) for b, t in times.items()}
    order = sorted(backends, key=score.__getitem__)
    candidates = {b: {"precision": precision_of(manifest, b), "call_ms": {str(k): round(v * 1e3, 3) for k, v in times[b].items()},
                      "score": round(score[b], 4)} for b in order}
    during = share.stop()
    return {"batches": list(best), "repeats": repeats, "load_average": load_info["load_average"], "others_cpus": during["others_cpus"],
            "warning": "; ".join(w for w in (load_info["warning"], during["warning"]) if w) or None, "order": order, "candidates": candidates}


def rank_stage(tmp_engine_dir: Path, manifest: dict) -> None:
    """``build_engine`` finalize stage of ``targets: auto`` (after parity): rank the backends that
    passed parity (all built ones when parity is off) at ``inputs.batch.opt`` and ``max``; record
    ``ranking`` and ``default_backend`` (the fastest) in ``manifest``.

    Candidates that failed parity are listed under ``ranking.failed`` and stay refused; the engine's
    ``status`` is ``ok`` when at least one candidate passed (its default backend is verified).
    """
    if manifest["recipe"].get("export", {}).get("targets") != ["auto"]:
        return
    built = built_backends(manifest)
    parity = (manifest.get("parity") or {}).get("backends")
    passed = [b for b in built if parity is None or parity.get(b, {}).get("passed")]
    ranking: dict = {"failed": [b for b in built if b not in passed]}
    if passed:
        batch = manifest["io"]["batch"]
        ranking.update(rank_backends(tmp_engine_dir, passed, [batch.get("opt", 1), batch.get("max", 1)]))
        manifest["default_backend"] = ranking["order"][0]
        if parity is not None:
            manifest["status"] = "ok"
    manifest["ranking"] = ranking


rank_stage.stage = "rank"
