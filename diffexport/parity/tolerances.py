"""Parity tolerances: a preset per precision, overridable in the recipe's ``parity:`` section.

All are relative L2 errors against the fp32 eager reference: ``per_call_rtol`` of the denoiser
output D for one call at any σ of the sweep, ``per_call_f_rtol`` of the network's prediction
F = (D - c_skip x) / c_out for the same calls (at small σ, c_skip ≈ 1 and D ≈ x, so D's error
hides F's: fp16 at σ = 0.002 measured D 5.8e-6 but F 4.1e-4), ``final_rtol`` of the sample at the
end of the whole sampler.

Measured (``benchmarks/parity_tolerances.py``; worst over the 8-σ sweep, 2 seeds each of the
quickstart SongUNet, DhariwalUNet, conditional SongUNetPosEmbd and the DDPM seed U-Net, all
weights randomised; CPU, 2026-12-01):

============  =====================  ========  ========  ========
precision     engines                D         F         final
============  =====================  ========  ========  ========
fp32          8 ONNX Runtime         2.6e-7    5.3e-6    1.9e-7
fp16          8 ONNX Runtime         5.0e-4    5.1e-4    2.3e-4
bf16          2 AOTInductor          3.9e-3    3.9e-3    2.2e-3
============  =====================  ========  ========  ========

(bf16 also: AOTI 3.1e-3 per call / 2.1e-3 final on ``edm-cifar10-ddpmpp``; OpenVINO bf16 1.7e-4.)
fp32's F error is the float32 rounding of D amplified by 1/c_out at σ = 0.002 (D itself is exact
to ~1e-7). Presets leave a margin of about 10x over these (fp32 D and final ~40x, fp16 D 4x:
its F gate is the binding one; bf16 5x), and a 50 % error in F at σ = 0.002 fails every preset.
"""

from __future__ import annotations

from typing import Any

PRESETS: dict[str, dict[str, float]] = {
    "fp32": {"per_call_rtol": 1e-5, "per_call_f_rtol": 1e-4, "final_rtol": 1e-4},
    "fp16": {"per_call_rtol": 2e-3, "per_call_f_rtol": 5e-3, "final_rtol": 2e-3},
    "bf16": {"per_call_rtol": 2e-2, "per_call_f_rtol": 2e-2, "final_rtol": 2e-2},
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
