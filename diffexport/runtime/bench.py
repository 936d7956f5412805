"""Latency of each backend beside the torch reference: one call, and one whole sample.

Medians over ``repeats`` after ``warmup`` calls; ratios are times over the torch reference's
(below 1: faster). FLOPs are counted once on the reference with
``torch.utils.flop_counter.FlopCounterMode`` (matmul-like ops: convolutions, linear, attention),
so GFLOP/s is the achieved rate of those ops on each backend.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from diffexport.engines.base import Engine
from diffexport.engines.load import load
from diffexport.engines.manifest import read_manifest
from diffexport.parity.checks import call_inputs  # noqa: F401  (kept out: runtime must not import parity)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones, and all times."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times
