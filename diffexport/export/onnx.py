"""ONNX target: the exported program through the dynamo ONNX exporter, checked, written atomically.

GroupNorm stays one op: at opset >= 21 each ``aten.group_norm`` becomes one
``GroupNormalization`` (per-channel scale, the semantics of torch); at opsets 18-20 the
exporter lowers it to one ``InstanceNormalization`` over a ``[B, G, -1]`` reshape plus the
per-channel affine. (``GroupNormalization``-18 took per-group scales and is deprecated: onnx's
checker rejects models that use it.) Either way there is no ReduceMean/Pow decomposition.

ONNX Runtime has no GroupNormalization kernel: it expands the function into ~20 small nodes per
norm. The file written therefore carries each 4-D GroupNormalization as the same math in standard
ops, Reshape, InstanceNormalization, Reshape and the per-channel affine (native kernels; about 8%
less time per call on the EDM CIFAR-10 UNet). That file, whose hash the manifest records, is what
every consumer runs unchanged: ONNX Runtime sessions, Triton's ``onnxruntime_onnx`` model,
OpenVINO, TensorRT; so the parity check of a session checks the artifact itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript
import torch
from onnx import helper, numpy_helper
from torch.export import ExportedProgram

from diffexport.export import GROUP_NORM_OPSET
from diffexport.export.denoiser import Denoiser
from diffexport.export.program import export_program
from diffexport.recipes import IOSpec


def export_onnx(
    program_or_denoiser: ExportedProgram | Denoiser, io: IOSpec, path: str | Path, *, precision: str = "fp32",
    opset: int = GROUP_NORM_OPSET,
) -> dict:
    """Write ``path`` (+ ``path.data`` when over 2 GB); returns the manifest fields of the artifact.

    Inputs and outputs carry the ``io`` names with a symbolic ``batch`` axis; constants are
    folded (including weight casts of fp16/bf16 graphs), shapes inferred, 4-D GroupNormalization
    written as InstanceNormalization (:func:`instance_norm_groups`), ``onnx.checker`` passes.
    """
    program = program_or_denoiser
    if not isinstance(program, ExportedProgram):
        program = export_program(program_or_denoiser, io, precision)
    path = Path(path)
    with _quiet():
        onnx_program = torch.onnx.export(
            program,
            input_names=[s.name for s in io.inputs],
            output_names=[s.name for s in io.outputs],
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    model = onnx_program.model
    _name_batch_axis(model)
    limit = max((v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None), default=0)
    onnxscript.optimizer.optimize(model, input_size_limit=limit, output_size_limit=limit)  # folds weight casts
    model.doc_string = f"diffexport denoiser, precision {precision}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx_program.save(tmp / path.name, external_data=None)  # external data only past 2 GB
        onnx.shape_inference.infer_shapes_path(str(tmp / path.name), str(tmp / path.name), strict_mode=True, data_prop=True)
        _rewrite_group_norms(tmp / path.name)
        onnx.checker.check_model(str(tmp / path.name), full_check=True)
        files = sorted(os.listdir(tmp), key=lambda name: name != path.name)  # the model first
        for name in reversed(files):  # external data before the model that points at it
            os.replace(tmp / name, path.parent / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    return {"file": path.name, "files": files, "opset": opset, "precision": precision, "group_norm": _group_norm_op(ops)}


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporter's warnings and log lines (e.g. "torchvision is not installed") off; errors stay."""
    log = logging.getLogger("torch.onnx")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _name_batch_axis(model: ir.Model) -> None:
    """Call the dynamic leading axis of every graph input and output ``batch``."""
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int):
            value.shape = ir.Shape(["batch", *value.shape[1:]])


def _group_norm_op(ops: set[str]) -> str | None:
    return next((op for op in ("GroupNormalization", "InstanceNormalization") if op in ops), None)


def _rewrite_group_norms(path: Path) -> None:
    """Rewrite the model file ``path`` in place with :func:`instance_norm_groups` (external
    weights stay where they are: only the graph proto is rewritten)."""
    model = onnx.load(str(path), load_external_data=False)
    if instance_norm_groups(model):
        onnx.save(model, str(path))


def instance_norm_groups(model: onnx.ModelProto) -> int:
    """Rewrite each 4-D ``GroupNormalization`` in place as ``InstanceNormalization`` over a
    ``[N, G, -1]`` view plus the per-channel affine (the exporter's opset-18 form); returns how many."""
    graph = model.graph
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input)}
    constants: dict[str, onnx.TensorProto] = {}

    def const(name: str, value: np.ndarray) -> str:
        constants.setdefault(name, numpy_helper.from_array(value, name))
        return name

    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "GroupNormalization" or node.domain not in ("", "ai.onnx") or rank.get(node.input[0]) != 4:
            nodes.append(node)
            continue
        (x, scale, bias), (y,), count = node.input, node.output, count + 1
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        g, eps, v = attrs["num_groups"], attrs.get("epsilon", 1e-5), f"{node.name or y}/instance_norm"
        ones, zeros = const(f"gn/ones{g}", np.ones(g, np.float32)), const(f"gn/zeros{g}", np.zeros(g, np.float32))
        per_channel = const("gn/c11", np.array([-1, 1, 1], np.int64))
        nodes += [
            helper.make_node("Reshape", [x, const(f"gn/groups{g}", np.array([0, g, -1], np.int64))], [f"{v}/grouped"]),
            helper.make_node("InstanceNormalization", [f"{v}/grouped", ones, zeros], [f"{v}/normed"], epsilon=eps),
            helper.make_node("Shape", [x], [f"{v}/shape"]),
            helper.make_node("Reshape", [f"{v}/normed", f"{v}/shape"], [f"{v}/out"]),
            helper.make_node("Reshape", [scale, per_channel], [f"{v}/scale"]),
            helper.make_node("Reshape", [bias, per_channel], [f"{v}/bias"]),
            helper.make_node("Mul", [f"{v}/out", f"{v}/scale"], [f"{v}/scaled"]),
            helper.make_node("Add", [f"{v}/scaled", f"{v}/bias"], [y]),
        ]
    if count:
        graph.ClearField("node")
        graph.node.extend(nodes)
        graph.initializer.extend(constants.values())
    return count
