"""Parity tolerances: a preset per precision, overridable in the recipe's ``parity:`` section.

Both are relative L2 errors against the fp32 eager reference: ``per_call_rtol`` for one denoiser
call at any σ of the sweep, ``final_rtol`` for the sample at the end of the whole sampler.

fp32: the engine computes the same function in the same precision; what is left is reduction
order, about 1e-7 per call and 1e-7 on the final sample (tiny recipes and ``edm-cifar10-ddpmpp``,
ONNX Runtime and AOTInductor on CPU). fp16/bf16 run matmul-like ops in the low precision against
the fp32 reference; measured on CPU: fp16 (ONNX Runtime, tiny recipes) about 2e-4 per call and
1.3e-4 final; bf16 (AOTInductor) 2.5e-3 per call and 1.2e-3 final on the quickstart recipe, 3.1e-3
and 2.1e-3 on ``edm-cifar10-ddpmpp``. The presets leave a margin of about 6-10x over these.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, float]] = {
    "fp32": {"per_call_rtol": 1e-5, "per_call_f_rtol": 1e-4, "final_rtol": 1e-4},
    "fp16": {"per_call_rtol": 2e-3, "per_call_f_rtol": 2e-2, "final_rtol": 2e-3},
    "bf16": {"per_call_rtol": 2e-2, "per_call_f_rtol": 1e-1, "final_rtol": 2e-2},
}


def tolerances(precision: str, parity: Any = None, **overrides: float | None) -> dict[str, float]:
    """``{"per_call_rtol", "per_call_f_rtol", "final_rtol"}``: the ``precision`` preset, then the recipe's ``parity``
    section (a ``diffexport.recipes.schema.Parity`` or its dict), then non-None ``overrides``."""
    if precision not in PRESETS:
        raise ValueError(f"no parity tolerances for precision {precision!r}; expected one of {', '.join(PRESETS)}")
    tol = dict(PRESETS[precision])
    section = parity.model_dump() if hasattr(parity, "model_dump") else dict(parity or {})
    for source in (section, overrides):
        tol.update({k: float(v) for k, v in source.items() if k in tol and v is not None})
    return tol
