"""One ``torch.export`` of the denoiser with a dynamic batch; every target is lowered from it."""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from diffexport.export.denoiser import Denoiser, example_inputs
from diffexport.export.precision import mixed_precision
from diffexport.recipes import IOSpec


def export_batch(io: IOSpec) -> int:
    """Example batch to trace with: 2 clamped to ``[min, max]`` (a size-1 example would be specialised)."""
    return min(max(2, io.batch["min"]), io.batch["max"])


def export_program(denoiser: Denoiser, io: IOSpec, precision: str = "fp32") -> ExportedProgram:
    """``torch.export.export(strict=False)`` of ``denoiser`` in eval mode, batch dynamic over
    ``io.batch`` (static when ``min == max``), precision decided in the graph (``mixed_precision``)."""
    lo, hi = io.batch["min"], io.batch["max"]
    batch = Dim("batch", min=lo, max=hi) if hi > lo else None
    args = example_inputs(io, export_batch(io), index_high=getattr(denoiser, "index_high", 1))
    # forward(x, sigma, *conditions): torch.export wants the varargs' specs as one nested tuple
    conditions = (tuple({0: batch} for _ in args[2:]),) if len(args) > 2 else ()
    dynamic = ({0: batch}, {0: batch}, *conditions) if batch is not None else None
    denoiser.eval()
    with torch.no_grad(), mixed_precision(precision):
        return torch.export.export(denoiser, args, dynamic_shapes=dynamic, strict=False)
