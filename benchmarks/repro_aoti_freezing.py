"""Minimal reproduction: AOTInductor + inductor freezing miscompiles a small NCSN++ SongUNet on CPU.

    PYTHONPATH=. python benchmarks/repro_aoti_freezing.py            # ~2-4 min on 2 cores

The same ``torch.export`` program is compiled by ``torch._inductor.aoti_compile_and_package``
under ``torch.no_grad()`` with ``freezing`` on and off (freezing only applies to inference
graphs, which is why grad mode changed the result), and by ``torch.compile`` with freezing
(JIT, default inductor configs). Measured on torch 2.13.0 CPU (relative L2 error against eager;
every parameter and floating buffer randomised, seeded; 2026-12-01):

    aoti  freezing=True   1.21e-02
    aoti  freezing=False  1.18e-07
    jit   freezing=True   1.21e-02

See docs/aoti_freezing.md for the bisection and the fix (diffexport compiles without freezing).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from diffexport.models import get_model_class

ARGS = dict(img_resolution=16, in_channels=3, out_channels=3, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
            attn_resolutions=[8], dropout=0.0, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
            decoder_type="skip", resample_filter=[1, 3, 3, 1])  # fmt: skip


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = get_model_class("SongUNet")(**ARGS).eval()
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape) / max(t[0].numel() if t.ndim > 1 else t.numel(), 1) ** 0.5)
    return net


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> int:
    net = model()
    args = (torch.randn(2, 3, 16, 16), torch.tensor([0.3, -0.7]), None)
    batch = torch.export.Dim("batch", min=1, max=4)
    with torch.no_grad():
        want = net(*args)
        program = torch.export.export(net, args, dynamic_shapes=({0: batch}, {0: batch}, None), strict=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for freezing in (True, False):
            path = str(Path(tmp) / f"f{freezing}.pt2")
            with torch.no_grad():
                torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs={"freezing": freezing})
                out = torch._inductor.aoti_load_package(path)(*args)
            results[f"aoti  freezing={freezing}"] = rel(out[0] if isinstance(out, (list, tuple)) else out, want)
    torch._inductor.config.freezing = True
    with torch.no_grad():
        results["jit   freezing=True"] = rel(torch.compile(program.module())(*args), want)
    for name, err in results.items():
        print(f"{name:22s} {err:.2e}")
    return 0 if results["aoti  freezing=True"] > 1e-4 else 1  # 0: the bug reproduces


if __name__ == "__main__":
    sys.exit(main())
