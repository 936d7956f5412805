"""AOTInductor target: the exported program compiled ahead of time into ``denoiser.pt2``.

The package loads in Python (``torch._inductor.aoti_load_package``) and in C++
(``torch::inductor::AOTIModelPackageLoader``). It runs only on the device type it was compiled
for: ``cpu`` here, ``cuda`` when built on a GPU (the program is moved there first).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from diffexport.recipes import IOSpec

# No freezing. Inductor's freezing (weights inlined as constants, constant folding, oneDNN
# pre-packing; about 30% faster per call on CPU) gives AOTInductor packages that are wrong for
# some configs: a small NCSN++ SongUNet came out at ~1e-2 relative error (JIT torch.compile with
# freezing too) while the frozen FX graph itself is exact (docs/aoti_freezing.md,
# benchmarks/repro_aoti_freezing.py). Freezing only applies under no_grad, which is why the
# bug showed there; weights stay runtime constants of the package instead.
INDUCTOR_CONFIGS: dict[str, Any] = {"freezing": False}


def export_aoti(
    program: ExportedProgram, io: IOSpec, path: str | Path, *, precision: str = "fp32", device: str = "cpu",
    inductor_configs: dict[str, Any] | None = None,
) -> dict:
    """Compile ``program`` for ``device`` into the package ``path`` (written atomically); returns
    the manifest fields of the artifact. ``inductor_configs`` override :data:`INDUCTOR_CONFIGS`."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"export.device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("export.device is 'cuda' but torch sees no CUDA device; build on a GPU machine or use 'cpu'")
        program = torch.export.passes.move_to_device_pass(program, "cuda")
    path = Path(path)
    configs = {**INDUCTOR_CONFIGS, **(inductor_configs or {})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.pt2")
    try:
        with torch.no_grad(), warnings.catch_warnings():  # torch's own pytree deprecation, raised inside its compile
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "files": [path.name], "device": device, "precision": precision, "inductor_configs": configs}
