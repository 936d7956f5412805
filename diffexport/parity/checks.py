"""The two parity checks of an engine against the torch reference: per call, and along a trajectory.

Each check is split into seeded inputs, runs (one per engine: the reference's can be reused for
every backend) and a comparison. Per call, the error is measured on the denoiser output D and on
the network's prediction F = (D - c_skip x) / c_out, with c_skip and c_out from the reference's
preconditioner at that σ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffexport.engines.base import Engine
from diffexport.parity.metrics import call_errors, errors
from diffexport.runtime.batching import BatchedEngine
from diffexport.runtime.inputs import random_call, random_conditions
from diffexport.runtime.sampler import SamplerSpec, image_shape, sample


def sigma_sweep(spec: SamplerSpec, num: int) -> list[float]:
    """``num`` log-spaced σ from the schedule's largest to its smallest positive EDM noise level."""
    s = spec.edm_sigmas()
    s = s[s > 0]
    hi, lo = math.log(float(s.max())), math.log(float(s.min()))
    return [math.exp(hi + (lo - hi) * i / (num - 1)) for i in range(num)]


def call_inputs(engine: Engine, sigmas: list[float], batch: int, seed: int, index_high: int = 1) -> list[dict[str, torch.Tensor]]:
    """Per σ, the seeded inputs of one call (:func:`~diffexport.runtime.inputs.random_call`)."""
    g = torch.Generator().manual_seed(seed)
    return [random_call(engine, sigma, batch, g, index_high) for sigma in sigmas]


@torch.no_grad()
def call_outputs(engine: Engine, inputs: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
    """``engine`` on each input set, outputs on CPU.

    The sets are stacked into one batch and run in chunks of the engine's ``batch.max``
    (:class:`~diffexport.runtime.batching.BatchedEngine`; rows never interact), so a sweep of
    8 σ at batch 2 is one call of 16 rows where the engine allows it, not 8 calls.
    """
    if not inputs:
        return []
    stacked = {k: torch.cat([i[k] for i in inputs]).to(engine.device) for k in inputs[0]}
    out = BatchedEngine(engine)(**stacked).cpu()
    return list(out.split([i["x"].shape[0] for i in inputs]))


@torch.no_grad()
def coefficients(reference: Engine, inputs: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per input set, ``(c_skip, c_out)`` of the reference's preconditioner at its σ (engine contract
    D(x, σ)), shaped [B, 1, ..., 1] like ``x``, on CPU.

    Every built-in preconditioner (EDM, VE, VP, iDDPM, DDPM) gives them from σ through
    ``compute_coefficients``, whatever its ``forward`` takes (σ or a diffusion time).
    """
    pre = reference.denoiser.preconditioner
    out = []
    for i in inputs:
        sigma = i["sigma"].reshape(-1, *[1] * (i["x"].ndim - 1)).to(reference.device, torch.float32)
        _, _, c_out, c_skip = pre.compute_coefficients(sigma)
        out.append((c_skip.expand_as(sigma).cpu(), c_out.expand_as(sigma).cpu()))
    return out


def compare_calls(sigmas: list[float], refs: list[torch.Tensor], outs: list[torch.Tensor],
                  inputs: list[dict[str, torch.Tensor]], coefs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """``[{"sigma", "max_abs", "rel_l2", "f_max_abs", "f_rel_l2"}]``: per σ, the errors of D and of F."""
    return [{"sigma": s, **call_errors(r, o, i["x"], c_skip, c_out)}
            for s, r, o, i, (c_skip, c_out) in zip(sigmas, refs, outs, inputs, coefs)]


@dataclass(frozen=True)
class TrajectoryInputs:
    latents: torch.Tensor  # [B, C, H, W], noise at the first time step
    conditions: dict[str, torch.Tensor]
    seed: int  # of the per-step noise


def trajectory_inputs(engine: Engine, spec: SamplerSpec, batch: int, seed: int, index_high: int = 1) -> TrajectoryInputs:
    """Seeded latents and conditions for :func:`trajectory_states` (on CPU)."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = image_shape(engine, spec)
    latents = spec.scheduler.init_latents((c, h, w), spec.time_steps[:1].expand(batch), g, dtype=torch.float32)
    return TrajectoryInputs(latents, random_conditions(engine, batch, g, index_high, (h, w) if spec.patching else None), seed)


@torch.no_grad()
def trajectory_states(engine: Engine, spec: SamplerSpec, inputs: TrajectoryInputs) -> list[torch.Tensor]:
    """The state after every step of the whole sampler (the last one is the sample), on CPU.

    The per-step noise of a stochastic solver comes from ``inputs.seed`` on the engine's device,
    so two engines on one device see the same noise. NaN/Inf are kept (and compared), not raised.
    """
    states: list[torch.Tensor] = []
    sample(engine, spec, latents=inputs.latents, conditions=inputs.conditions, seed=inputs.seed, check_finite=False,
           on_step=lambda i, t_cur, t_next, x: states.append(x.detach().cpu().clone()))
    return states


def compare_steps(spec: SamplerSpec, refs: list[torch.Tensor], outs: list[torch.Tensor]) -> dict:
    """``{"steps": [{"step", "t", "sigma", "max_abs", "rel_l2"}], "final": {"max_abs", "rel_l2"}}``."""
    sig = spec.edm_sigmas()
    steps = [{"step": i, "t": float(spec.time_steps[i + 1]), "sigma": float(sig[i + 1]), **errors(r, o)}
             for i, (r, o) in enumerate(zip(refs, outs))]
    return {"steps": steps, "final": errors(refs[-1], outs[-1])}
