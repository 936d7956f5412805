"""AOTInductor backend: a ``denoiser.pt2`` package compiled for one device type."""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.engines.base import EngineError, check_inputs
from diffexport.recipes import IOSpec


class AOTIEngine:
    """``torch._inductor.aoti_load_package`` of ``path``, called with the manifest's input order.

    ``compiled_for`` is the device type the package was compiled for (from the manifest); an
    AOTI package runs only there, so a different ``device`` is an error.
    """

    backend = "aoti"

    def __init__(self, path: str | Path, io: IOSpec, device: str | torch.device | None = None, compiled_for: str = "cpu"):
        self.io, self.path = io, Path(path)
        self.device = torch.device(device if device is not None else compiled_for)
        if self.device.type != compiled_for:
            raise EngineError(f"{self.path}: compiled for {compiled_for}, cannot run on {self.device}; rebuild with export.device: {self.device.type}")
        from torch._inductor import aoti_load_package

        index = self.device.index if self.device.index is not None else -1
        try:
            self._runner = aoti_load_package(str(self.path), device_index=index)
        except Exception as e:  # the loader raises RuntimeError with C++ detail
            raise EngineError(f"{self.path}: cannot load AOTInductor package: {str(e).splitlines()[0]}") from e

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        inputs = check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})
        out = self._runner(*(t.to(self.device).contiguous() for t in inputs))
        return out[0] if isinstance(out, (list, tuple)) else out
