"""Call an engine on any batch: chunks of at most its ``batch.max``, the last padded to ``batch.min``."""

from __future__ import annotations

import torch

from diffexport.engines.base import Engine


def batch_range(engine: Engine) -> tuple[int, int]:
    """``(min, max)`` batch of ``engine`` from its I/O contract."""
    b = engine.io.batch
    lo = int(b.get("min", 1))
    return lo, int(b.get("max", max(lo, 1 << 30)))


def clamp_batch(engine: Engine, batch: int) -> int:
    """``batch`` moved into the engine's batch range."""
    lo, hi = batch_range(engine)
    return min(max(batch, lo), hi)


class BatchedEngine:
    """``engine(x, sigma, **conditions)`` for any batch size N.

    Splits the N rows into consecutive chunks of at most ``chunk`` rows (default: the engine's
    ``batch.max``); a chunk below ``batch.min`` is padded by repeating its last row and the padding
    is dropped from the output. Rows never interact, so the result does not depend on ``chunk``.
    """

    def __init__(self, engine: Engine, chunk: int | None = None):
        self.engine, (self.lo, hi) = engine, batch_range(engine)
        if chunk is not None and not self.lo <= chunk <= hi:
            raise ValueError(f"chunk {chunk} is outside the engine's batch range [{self.lo}, {hi}]")
        self.chunk = chunk or hi
        self.backend, self.io, self.device = engine.backend, engine.io, engine.device

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if self.lo <= n <= self.chunk:
            return self.engine(x, sigma, **conditions)
        outs = []
        for start in range(0, n, self.chunk):
            rows = {"x": x, "sigma": sigma, **conditions}
            part = {k: v[start:start + self.chunk] for k, v in rows.items()}
            size = part["x"].shape[0]
            if size < self.lo:
                part = {k: torch.cat([v, v[-1:].expand(self.lo - size, *v.shape[1:])]) for k, v in part.items()}
            outs.append(self.engine(**part)[:size])
        return torch.cat(outs)
