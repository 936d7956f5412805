"""Find the first model module whose output departs from the eager reference, for any backend
that compiles a ``torch.export`` program (AOTInductor today).

The backend's artifact is a compiled graph with no names inside, so the search recompiles: the
reference denoiser is wrapped so that the outputs of chosen modules (forward hooks) become extra
outputs of the same exported function, that program is compiled by the backend's own export
function (``compile_program``), and each extra output is compared with the eager module output.
Modules are probed level by level: the model's top-level blocks first (``enc.16x16_block0``,
...), then the children of the first diverging block, down to a leaf; each level is one compile.
The named module is the first one, in execution order, whose relative L2 error exceeds ``rtol``
while everything that ran before it passes. Exposing intermediates can change how a compiler
fuses them, so a divergence that vanishes when probed is reported as such (``None``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from diffexport.export.denoiser import Denoiser
from diffexport.parity.metrics import errors

CompileProgram = Callable[[torch.export.ExportedProgram], Callable[..., Sequence[Tensor] | Tensor]]


@dataclass
class ModuleDivergence:
    """The first diverging module (path inside the model, e.g. ``enc.16x16_block0.conv1``)."""

    module: str
    kind: str
    rel_l2: float
    max_abs: float
    probed: int  # modules compared, over all levels

    def __str__(self) -> str:
        return f"first diverging module: {self.module} ({self.kind}), rel L2 {self.rel_l2:.3g}, max abs {self.max_abs:.3g}"

    def to_dict(self) -> dict:
        return asdict(self)


class _Probed(nn.Module):
    """``denoiser`` returning ``(denoised, *outputs of modules)`` for the named ``modules``."""

    def __init__(self, denoiser: Denoiser, model: nn.Module, names: Sequence[str]):
        super().__init__()
        self.denoiser, self.names = denoiser, list(names)
        self.index_high = denoiser.index_high  # export_program draws index inputs below it
        self._modules_of = dict(model.named_modules())

    def forward(self, x: Tensor, sigma: Tensor, *conditions: Tensor) -> tuple[Tensor, ...]:
        seen: dict[str, Tensor] = {}
        hooks = [self._modules_of[n].register_forward_hook(_keep(seen, n)) for n in self.names]
        try:
            out = self.denoiser(x, sigma, *conditions)
        finally:
            for h in hooks:
                h.remove()
        return (out, *(seen[n].float() for n in self.names))


def _keep(seen: dict[str, Tensor], name: str) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(output, Tensor) and name not in seen:  # first call: modules run once here
            seen[name] = output

    return hook


def model_of(denoiser: Denoiser) -> nn.Module:
    """The recipe's model inside ``denoiser`` (Denoiser -> preconditioner -> wrapper -> model)."""
    return denoiser.preconditioner.model.model


def _run_order(model: nn.Module, denoiser: Denoiser, args: tuple) -> list[str]:
    """Names of ``model``'s modules that return one tensor, in the order they first run."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n) if isinstance(o, Tensor) and n not in order else None)
             for n, m in model.named_modules() if n]  # fmt: skip
    try:
        with torch.no_grad():
            denoiser(*args)
    finally:
        for h in hooks:
            h.remove()
    return order


def _children(names: list[str], parent: str) -> list[str]:
    """The modules of ``names`` whose nearest ancestor in ``names`` is ``parent`` ("" = the model),
    in order; containers that never run (``ModuleDict``) are looked through."""
    prefix = f"{parent}." if parent else ""
    inside = [n for n in names if n.startswith(prefix) and n != parent]
    return [n for n in inside if not any(n.startswith(f"{m}.") for m in inside if m != n)]


def locate_module(
    denoiser: Denoiser, args: tuple[Tensor, ...], compile_program: CompileProgram, export: Callable, rtol: float,
) -> ModuleDivergence | None:
    """The first module of ``denoiser``'s model whose output, compiled by ``compile_program`` from
    ``export(probed_denoiser)`` (the build's ``export_program``), departs by more than ``rtol``
    relative L2 from eager on ``args``; ``None`` when no probed module does."""
    denoiser.eval()
    model = model_of(denoiser)
    order = _run_order(model, denoiser, args)
    modules = dict(model.named_modules())
    parent, found, probed = "", None, 0
    while True:
        level = _children(order, parent)
        if not level:
            return found
        probe = _Probed(denoiser, model, level)
        with torch.no_grad():
            want = probe(*args)[1:]
        got = compile_program(export(probe))(*args)
        got = list(got)[1:]
        probed += len(level)
        bad = None
        for name, w, g in zip(level, want, got):
            e = errors(w, g)
            if not e["rel_l2"] <= rtol:  # NaN counts as diverging
                bad = ModuleDivergence(name, type(modules[name]).__name__, e["rel_l2"], e["max_abs"], probed)
                break
        if bad is None:
            return found
        found, parent = bad, bad.module


def aoti_compiler(io, device: str = "cpu") -> CompileProgram:
    """``compile_program`` for AOTInductor: the build's :func:`~diffexport.export.aoti.export_aoti`
    into a temporary package, loaded back."""
    import tempfile
    from pathlib import Path

    from diffexport.export.aoti import export_aoti

    def compile_program(program: torch.export.ExportedProgram):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.pt2"
            export_aoti(program, io, path, device=device)
            runner = torch._inductor.aoti_load_package(str(path))
        return lambda *args: runner(*(a.to(device) for a in args))

    return compile_program


def locate_in_artifact(record: dict, denoiser: Denoiser, io, inputs: dict[str, Tensor] | tuple[Tensor, ...], rtol: float) -> ModuleDivergence | None:
    """:func:`locate_module` for the artifact ``record`` (a manifest ``artifacts`` entry) of a
    backend compiled from the exported program (AOTInductor), on one call's ``inputs`` (by name
    or in engine order); ``ValueError`` for others."""
    from diffexport.export.program import export_program

    if isinstance(inputs, dict):
        inputs = tuple(inputs[s.name] for s in io.inputs)
    if not record["file"].endswith(".pt2"):
        raise ValueError(f"{record['file']}: module location needs a backend compiled from the torch.export program (AOTInductor)")
    precision = record.get("precision", "fp32")
    return locate_module(denoiser, tuple(t.cpu() for t in inputs), aoti_compiler(io, record.get("device", "cpu")),
                         lambda probe: export_program(probe, io, precision), rtol)
