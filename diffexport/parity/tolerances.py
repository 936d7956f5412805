"""Parity tolerances: a preset per precision, overridable in the recipe's ``parity:`` section.

Both are relative L2 errors against the fp32 eager reference: ``per_call_rtol`` for one denoiser
call at any σ of the sweep, ``final_rtol`` for the sample at the end of the whole sampler.

fp32: the engine computes the same function in the same precision; what is left is reduction
order (1e-7..1e-6 per call), amplified along the trajectory. fp16/bf16: the presets hold the
values measured on the tiny recipes of the test suite and on ``edm-cifar10-ddpmpp`` (see the
parity reports written by ``diffexport build``), with margin: per call about 1e-3 (fp16) and 8e-3
(bf16; 8 mantissa bits), final samples a few times more.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, float]] = {
    "fp32": {"per_call_rtol": 1e-5, "final_rtol": 1e-4},
    "fp16": {"per_call_rtol": 5e-3, "final_rtol": 2e-2},
    "bf16": {"per_call_rtol": 3e-2, "final_rtol": 1e-1},
}


def tolerances(precision: str, parity: Any = None, **overrides: float | None) -> dict[str, float]:
    """``{"per_call_rtol", "final_rtol"}``: the ``precision`` preset, then the recipe's ``parity``
    section (a ``diffexport.recipes.schema.Parity`` or its dict), then non-None ``overrides``."""
    if precision not in PRESETS:
        raise ValueError(f"no parity tolerances for precision {precision!r}; expected one of {', '.join(PRESETS)}")
    tol = dict(PRESETS[precision])
    section = parity.model_dump() if hasattr(parity, "model_dump") else dict(parity or {})
    for source in (section, overrides):
        tol.update({k: float(v) for k, v in source.items() if k in tol and v is not None})
    return tol
