"""Stop a sampling run at the first NaN or Inf, naming the step, the noise level and the backend."""

from __future__ import annotations

import torch

from diffexport.engines.base import Engine


class SamplingError(RuntimeError):
    """A sampling run that cannot go on; the message names the step, σ and backend."""


class FiniteGuard:
    """Wraps an engine: every output is checked for NaN/Inf, and so is the state after each step.

    ``step`` is the index of the sampler step being computed; :meth:`on_step` (the ``on_step``
    hook of :func:`diffexport.diffusion.samplers.sample`) advances it and checks the new state.
    """

    def __init__(self, engine: Engine):
        self.engine, self.step = engine, 0
        self.backend, self.io, self.device = engine.backend, engine.io, engine.device

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        out = self.engine(x, sigma, **conditions)
        if not bool(torch.isfinite(out).all()):
            raise SamplingError(self._where("the denoiser output", out, sigma))
        return out

    def on_step(self, i: int, t_cur: torch.Tensor, t_next: torch.Tensor, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise SamplingError(f"{self.backend}: non-finite values in the state x after step {i} "
                                f"(t {float(t_cur):g} -> {float(t_next):g}); {_count(x)}")
        self.step = i + 1

    def _where(self, what: str, t: torch.Tensor, sigma: torch.Tensor) -> str:
        s = sigma.flatten()
        sig = f"{float(s[0]):g}" if bool((s == s[0]).all()) else f"{float(s.min()):g}..{float(s.max()):g}"
        return f"{self.backend}: non-finite values in {what} at step {self.step} (sigma={sig}); {_count(t)}"


def _count(t: torch.Tensor) -> str:
    bad = ~torch.isfinite(t)
    return f"{int(bad.sum())} of {t.numel()} values are NaN/Inf ({int(torch.isnan(t).sum())} NaN)"
