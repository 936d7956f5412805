"""Latency and throughput of ``<name>_sampler`` on a real Triton server, at several client
concurrencies, with and without the sampler's dynamic batching; and how long the models take to load.

    diffexport build recipes/quickstart.yaml
    .venv/bin/python benchmarks/bench_triton.py engines/quickstart [--requests 32] [--batch 1]

Each client thread sends full sampling requests (``latents`` [batch, C, H, W]) over HTTP, one at
a time, and keeps its connection; latency is per request, throughput is requests (and samples) per
second of wall time. The engine is copied to a temporary folder and its repository written there
twice (batching on, then off), so the engine itself is untouched. The repository is chosen like
``diffexport serve`` does (the self-contained one on a Triton with only the Python backend). Load
time: from the server's start to ready (both models), and each model's load from the server log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from diffexport.deploy.triton import (
    TritonServer,
    available_backends,
    model_names,
    python_only_reason,
    write_repository,
)
from diffexport.deploy.triton.config import Instances
from diffexport.engines.manifest import read_manifest

_local = threading.local()


def request(url: str, model: str, tensors: dict[str, np.ndarray]) -> float:
    """Seconds for one sampling request (one client per thread, kept between its requests);
    ``tensors``: ``latents`` and the engine's conditions."""
    if getattr(_local, "url", None) != url:
        _local.client, _local.url = httpclient.InferenceServerClient(url), url
    inputs = []
    for name, a in tensors.items():
        inputs.append(httpclient.InferInput(name, list(a.shape), "FP32" if a.dtype == np.float32 else "INT64"))
        inputs[-1].set_data_from_numpy(a)
    t0 = time.perf_counter()
    _local.client.infer(model, inputs).as_numpy("samples")
    return time.perf_counter() - t0


def counts(url: str) -> dict[str, tuple[int, int]]:
    """Per model, (inferences, executions) so far: their ratio is the mean batch Triton formed."""
    stats = httpclient.InferenceServerClient(url).get_inference_statistics()["model_stats"]
    return {m["name"]: (int(m["inference_count"]), int(m["execution_count"])) for m in stats}


def run(url: str, model: str, latents: dict[str, np.ndarray], concurrency: int, requests: int) -> dict:
    errors = 0
    before = counts(url)

    def one(_: int) -> float:
        nonlocal errors
        try:
            return request(url, model, latents)
        except Exception:
            errors += 1
            return float("nan")

    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        lat = np.array(list(pool.map(one, range(requests))))
        wall = time.perf_counter() - t0
    ok = lat[np.isfinite(lat)]
    after = counts(url)
    mean_batch = {name: round((n - before[name][0]) / max(1, e - before[name][1]), 2) for name, (n, e) in after.items()}
    return {"mean_batch": mean_batch,
        "concurrency": concurrency, "requests": requests, "errors": errors, "batch": latents["latents"].shape[0],
        "p50_ms": float(np.percentile(ok, 50) * 1e3), "p99_ms": float(np.percentile(ok, 99) * 1e3),
        "req_per_s": len(ok) / wall, "samples_per_s": len(ok) * latents["latents"].shape[0] / wall,
    }


def model_load_seconds(log: Path) -> dict[str, float]:
    """Per model, seconds from ``loading:`` to ``successfully loaded`` in a Triton log."""
    stamp = re.compile(r'^I\d{4} (\d\d:\d\d:\d\d\.\d+) .*"(loading: |successfully loaded )\'?([\w-]+)')
    start, took = {}, {}
    for line in log.read_text(errors="replace").splitlines():
        m = stamp.match(line)
        if m:
            t = datetime.strptime(m.group(1), "%H:%M:%S.%f")
            name = m.group(3)
            if m.group(2).startswith("loading"):
                start[name] = t
            elif name in start:
                took[name] = (t - start[name]).total_seconds()
    return took


def bench(engine: Path, python_only: bool, batching: bool, latents: dict[str, np.ndarray], args: argparse.Namespace, model: str) -> dict:
    repo = write_repository(engine, python_only=python_only, batching=batching, instances=Instances(args.instances))
    log = engine / f"server-{'batching' if batching else 'nobatching'}.log"
    server = TritonServer(repo, log_file=log)
    t0 = time.perf_counter()
    with server:
        ready_s = time.perf_counter() - t0
        url = f"127.0.0.1:{server.http_port}"
        for _ in range(2):  # warm-up: first calls load sessions and caches
            request(url, model, latents)
        results = []
        for n in args.concurrency:
            time.sleep(0.3)
            results.append(run(url, model, latents, n, max(args.requests, 2 * n)))
        _local.__dict__.clear()
    return {"batching": batching, "ready_s": ready_s, "model_load_s": model_load_seconds(log), "results": results,
            "load_average": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine_dir", type=Path, nargs="?", default=Path("engines/quickstart"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=32, help="requests per concurrency level (at least 2 per client)")
    ap.add_argument("--batch", type=int, default=1, help="samples per request")
    ap.add_argument("--python-only", action="store_true")
    ap.add_argument("--instances", type=int, default=1, help="CPU instances of each model (instance_group count)")
    ap.add_argument("--only", choices=["batching", "nobatching"], help="run one mode only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    manifest = read_manifest(args.engine_dir)
    python_only = python_only_reason(manifest, available_backends(), forced=args.python_only) is not None
    _, sampler = model_names(manifest["name"])
    _, c, h, w = manifest["io"]["inputs"][0]["shape"]
    latents = {"latents": (np.random.default_rng(0).standard_normal((args.batch, c, h, w)) * manifest["sampler"]["sigmas"][0]).astype(np.float32)}
    for spec in manifest["io"]["inputs"][2:]:  # the conditions (a vector gets a one-hot of class 0; global_index is the sampler's)
        if spec["name"] != "global_index":
            a = np.zeros((args.batch, *spec["shape"][1:]), dtype=np.float32 if spec["dtype"] == "float32" else np.int64)
            if spec.get("kind") == "vector" or (a.dtype == np.float32 and a.ndim == 2):
                a[:, 0] = 1
            latents[spec["name"]] = a
    s = manifest["sampler"]
    print(f"engine {args.engine_dir} ({manifest['name']}): {s['solver']}, {s['num_steps']} steps, x {[args.batch, c, h, w]}, "
          f"{'triton-python' if python_only else 'triton'}, load average before {os.getloadavg()[0]:.2f}")
    modes = [m for m in (True, False) if args.only is None or args.only == ("batching" if m else "nobatching")]
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        engine = Path(tmp) / args.engine_dir.name
        shutil.copytree(args.engine_dir, engine, ignore=shutil.ignore_patterns("triton", "triton-python"))
        out = [bench(engine, python_only, b, latents, args, sampler) for b in modes]
    for mode in out:
        loads = ", ".join(f"{k} {v:.1f} s" for k, v in mode["model_load_s"].items())
        print(f"\ndynamic batching {'on' if mode['batching'] else 'off'}: ready after {mode['ready_s']:.1f} s ({loads}); "
              f"load average after {mode['load_average'][0]:.2f}")
        print(f"{'concurrency':>11} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8} {'samples/s':>10} {'errors':>6}  mean batch per execute")
        for r in mode["results"]:
            batches = ", ".join(f"{k} {v}" for k, v in r["mean_batch"].items())
            print(f"{r['concurrency']:>11} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['req_per_s']:>8.2f} {r['samples_per_s']:>10.2f} {r['errors']:>6}  {batches}")
        one = next((r for r in mode["results"] if r["concurrency"] == 1), None)
        if one:
            print("speed-up over one client: " + ", ".join(f"{r['concurrency']}: {r['req_per_s'] / one['req_per_s']:.2f}x" for r in mode["results"]))
    if args.json:
        args.json.write_text(json.dumps({"engine": str(args.engine_dir), "modes": out}, indent=2))


if __name__ == "__main__":
    main()
