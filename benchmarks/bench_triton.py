"""Latency and throughput of ``<name>_sampler`` on a real Triton server, at several client concurrencies.

    diffexport build recipes/quickstart.yaml
    .venv/bin/python benchmarks/bench_triton.py engines/quickstart [--requests 24] [--batch 1]

Each client thread sends full sampling requests (``latents`` [batch, C, H, W]) over HTTP, one at
a time; latency is per request, throughput is requests (and samples) per second of wall time.
The repository is chosen like ``diffexport serve`` does (the self-contained one on a Triton with
only the Python backend).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.http as httpclient

from diffexport.deploy.triton import (
    TritonServer,
    available_backends,
    model_names,
    python_only_reason,
    repository_dir,
    write_repository,
)
from diffexport.engines.manifest import read_manifest


def request(url: str, model: str, latents: np.ndarray) -> float:
    """Seconds for one sampling request (a fresh client per thread call keeps threads independent)."""
    client = httpclient.InferenceServerClient(url)
    x = httpclient.InferInput("latents", list(latents.shape), "FP32")
    x.set_data_from_numpy(latents)
    try:
        t0 = time.perf_counter()
        client.infer(model, [x]).as_numpy("samples")
        return time.perf_counter() - t0
    finally:
        client.close()


def run(url: str, model: str, latents: np.ndarray, concurrency: int, requests: int) -> dict:
    with ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        lat = np.array(list(pool.map(lambda _: request(url, model, latents), range(requests))))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency, "requests": requests, "batch": latents.shape[0],
        "p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "req_per_s": requests / wall, "samples_per_s": requests * latents.shape[0] / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine_dir", type=Path, nargs="?", default=Path("engines/quickstart"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=24, help="requests per concurrency level")
    ap.add_argument("--batch", type=int, default=1, help="samples per request")
    ap.add_argument("--python-only", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    manifest = read_manifest(args.engine_dir)
    python_only = python_only_reason(manifest, available_backends(), forced=args.python_only) is not None
    repo = repository_dir(args.engine_dir, python_only)
    if not repo.is_dir():
        write_repository(args.engine_dir, python_only=python_only)
    _, sampler = model_names(manifest["name"])
    _, c, h, w = manifest["io"]["inputs"][0]["shape"]
    latents = (np.random.default_rng(0).standard_normal((args.batch, c, h, w)) * manifest["sampler"]["sigmas"][0]).astype(np.float32)
    sampler_cfg = manifest["sampler"]
    print(f"engine {args.engine_dir} ({manifest['name']}): {sampler_cfg['solver']}, {sampler_cfg['num_steps']} steps, "
          f"x {[args.batch, c, h, w]}, repository {repo.name}, instances {manifest['recipe']['deploy']['triton_instances']}")

    with TritonServer(repo) as server:
        url = f"127.0.0.1:{server.http_port}"
        for _ in range(2):  # warm-up: first calls load sessions and caches
            request(url, sampler, latents)
        results = [run(url, sampler, latents, n, args.requests) for n in args.concurrency]
    print(f"{'concurrency':>11} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>8} {'samples/s':>10}")
    for r in results:
        print(f"{r['concurrency']:>11} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['req_per_s']:>8.2f} {r['samples_per_s']:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"engine": str(args.engine_dir), "repository": repo.name, "results": results}, indent=2))


if __name__ == "__main__":
    main()
