"""Find the first ONNX node whose output departs from the torch reference.

The dynamo exporter records, on every ONNX node, the FX node it came from
(``metadata_props["pkg.torch.onnx.fx_node"]``, ``"%name : ... target=..."``). FX names are not
stable between two exports (counters are global), so the mapping is built in three steps:

1. export the reference denoiser again as the build did (``export_program`` at the engine's
   precision, then ``torch.onnx.export(..., dynamo=True)``): that export's FX program and ONNX
   graph share names, and interpreting the program gives every FX node's tensor;
2. align the engine's ONNX nodes with the fresh export's nodes (``difflib`` over op type, FX
   target and module scope: identical graphs align one to one, inserted casts or rewrites are
   skipped);
3. for each FX node, the last ONNX node it produced carries its value.

The search then looks for the first candidate, in the engine graph's topological order, whose
relative L2 error exceeds ``rtol`` and whose matched ancestors all pass. Each round exposes up to
``probes_per_round`` candidates as extra graph outputs of one ONNX Runtime session: a failing probe
narrows the search to its ancestors, a passing one clears itself and its ancestors (errors are
assumed to propagate downstream, which holds unless a later op masks them). It ends when the
current failing node has no uncleared ancestor left; exact when everything fits in one round.
"""

from __future__ import annotations

import contextlib
import difflib
import io as io_
import logging
import re
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from diffexport.export import Denoiser, export_program
from diffexport.parity.metrics import errors
from diffexport.recipes import IOSpec

_FX = "pkg.torch.onnx.fx_node"
_SCOPES = "pkg.torch.onnx.name_scopes"
_FX_RE = re.compile(r"%(\S+) :.*?target=([^\]]+)\]")
_SKIP_TYPES = {onnx.TensorProto.BFLOAT16, onnx.TensorProto.STRING}


@dataclass(frozen=True)
class Divergence:
    """The first ONNX node (topological order) whose output exceeds the tolerance."""

    node: str  # ONNX node name
    op_type: str
    value: str  # the ONNX value compared (the node's first output)
    fx_node: str  # the reference FX node it was matched with
    module: str  # module path of that FX node ("" for the top-level module)
    max_abs: float
    rel_l2: float
    rtol: float
    position: int  # index of the node in the engine graph
    candidates: int  # ONNX values that could be matched with a reference tensor
    probed: int  # how many of them were compared

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = f" in module '{self.module}'" if self.module else ""
        return (f"ONNX node '{self.node}' ({self.op_type}, output '{self.value}', FX node '{self.fx_node}'{where}) "
                f"is the first to exceed rtol {self.rtol:g}: rel_l2 {self.rel_l2:.3g}, max_abs {self.max_abs:.3g}")


def _meta(node: onnx.NodeProto) -> tuple[str | None, str, str]:
    """(FX node name, FX target, module path) recorded on ``node`` (name None when absent)."""
    props = {p.key: p.value for p in node.metadata_props}
    m = _FX_RE.match(props.get(_FX, ""))
    scopes = re.findall(r"'([^']*)'", props.get(_SCOPES, ""))
    module = scopes[-2] if len(scopes) >= 2 else ""
    return (m.group(1), m.group(2).removeprefix("torch.ops."), module) if m else (None, "", module)


def _signature(node: onnx.NodeProto) -> tuple:
    _, target, module = _meta(node)
    return node.domain, node.op_type, target, module


@torch.no_grad()
def _reference_values(program: torch.export.ExportedProgram, args: tuple) -> dict[str, torch.Tensor]:
    """Every tensor the FX program computes on ``args``, by FX node name."""
    values: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node):
            out = super().run_node(n)
            if n.op == "call_function" and isinstance(out, torch.Tensor):
                values[n.name] = out.detach()
            return out

    Recorder(program.module()).run(*args)
    return values


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints, warnings and log lines (e.g. about torchvision)."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io_.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _fresh_export(denoiser: Denoiser, io: IOSpec, precision: str, opset: int) -> torch.onnx.ONNXProgram:
    program = export_program(denoiser, io, precision)
    with _quiet():
        return torch.onnx.export(program, input_names=[s.name for s in io.inputs], output_names=[s.name for s in io.outputs],
                                 opset_version=opset, dynamo=True, optimize=True, verbose=False)


def _candidates(engine: onnx.ModelProto, fresh: onnx.ModelProto, values: dict[str, torch.Tensor]) -> list[tuple[int, str, str]]:
    """``(engine node index, fx name, module)`` of every engine node that carries a reference tensor."""
    last: dict[str, int] = {}  # fx name -> index of its last node in the fresh graph
    for i, node in enumerate(fresh.graph.node):
        name = _meta(node)[0]
        if name is not None:
            last[name] = i
    carriers = {i: name for name, i in last.items() if name in values}
    a = [_signature(n) for n in engine.graph.node]
    b = [_signature(n) for n in fresh.graph.node]
    out = []
    for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
        for k in range(block.size):
            j = block.b + k
            if j in carriers:
                out.append((block.a + k, carriers[j], _meta(fresh.graph.node[j])[2]))
    return out


def _skipped_types(engine: onnx.ModelProto) -> set[str]:
    """Values whose inferred element type ONNX Runtime cannot hand back as numpy (bf16, strings)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(engine, strict_mode=False)
    except Exception:  # inference is only an optimisation here
        return set()
    return {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type in _SKIP_TYPES}


def _spread(pool: list[int], k: int) -> list[int]:
    """Up to ``k`` entries of ``pool`` spread evenly over it, both ends included."""
    if len(pool) <= k:
        return pool
    return [pool[i] for i in sorted({round(i * (len(pool) - 1) / (k - 1)) for i in range(k)})]


def _ancestors(graph: onnx.GraphProto) -> list[int]:
    """Per node, a bitset (int) of the nodes upstream of it."""
    producer = {out: i for i, n in enumerate(graph.node) for out in n.output}
    anc: list[int] = []
    for n in graph.node:
        bits = 0
        for name in n.input:
            if (p := producer.get(name)) is not None:
                bits |= anc[p] | (1 << p)
        anc.append(bits)
    return anc


def locate_divergence(
    onnx_path: str | Path,
    denoiser: Denoiser,
    io: IOSpec,
    inputs: dict[str, torch.Tensor],
    rtol: float,
    *,
    precision: str = "fp32",
    opset: int = 18,
    probes_per_round: int = 64,
) -> Divergence | None:
    """The first node of the ONNX graph at ``onnx_path`` whose output's relative L2 error against the
    reference ``denoiser`` exceeds ``rtol``; ``None`` if none does.

    ``inputs``: the engine's inputs by name (CPU tensors); ``precision`` and ``opset``: those the
    engine was exported with (its manifest record), so the fresh export has the same graph.
    """
    import onnxruntime as ort

    args = tuple(inputs[s.name].cpu() for s in io.inputs)
    program = _fresh_export(denoiser.cpu().eval(), io, precision, opset)
    values = _reference_values(program.exported_program, args)
    engine = onnx.load(str(onnx_path))  # external data (denoiser.onnx.data) is read from its folder
    skipped = _skipped_types(engine)
    cands = [(i, fx, mod) for i, fx, mod in _candidates(engine, program.model_proto, values)
             if engine.graph.node[i].output[0] not in skipped]
    if not cands:
        raise ValueError(f"{onnx_path}: no ONNX node could be matched with the reference (no '{_FX}' metadata?)")
    feed = {s.name: t.numpy() for s, t in zip(io.inputs, args)}
    n_outputs = len(engine.graph.output)
    where = {pos: (fx, mod) for pos, fx, mod in cands}
    errs: dict[int, dict[str, float]] = {}

    def probe(positions: list[int]) -> None:
        names = [engine.graph.node[p].output[0] for p in positions]
        existing = {o.name for o in engine.graph.output}
        engine.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in existing)
        try:
            session = ort.InferenceSession(engine.SerializeToString(), providers=["CPUExecutionProvider"])
            got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))
        finally:
            del engine.graph.output[n_outputs:]
        for p, name in zip(positions, names):
            ref, out = values[where[p][0]], torch.from_numpy(np.asarray(got[name]))
            errs[p] = errors(ref, out) if out.shape == ref.shape else {"max_abs": float("nan"), "rel_l2": float("nan")}

    anc = _ancestors(engine.graph)
    failing: int | None = None  # the earliest failing node found so far
    cleared = 0  # bitset of nodes assumed to pass
    while True:
        pool = [p for p, _, _ in cands if not cleared >> p & 1 and p != failing and (failing is None or anc[failing] >> p & 1)]
        if not pool:
            break
        probes = _spread(pool, probes_per_round)
        probe(probes)
        for p in probes:
            if errs[p]["rel_l2"] > rtol:  # NaN (a shape mismatch) never fails
                failing = p
                break
            cleared |= anc[p] | (1 << p)
    if failing is None:
        return None
    node, (fx, module) = engine.graph.node[failing], where[failing]
    e = errs[failing]
    return Divergence(node.name, node.op_type, node.output[0], fx, module, e["max_abs"], e["rel_l2"], rtol, failing, len(cands), len(errs))
