"""``config.pbtxt`` for the two Triton models of an engine: the denoiser and the sampler.

Configs are built as plain dicts and written in protobuf text format by :func:`to_pbtxt`
(no protobuf dependency at build time; the tests parse the result with Triton's own
``ModelConfig`` message). Enum values are :class:`Ident` so they are written unquoted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffexport.recipes import IOSpec, TensorSpec

DATA_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
SAMPLER_INPUTS = ("latents", "seed")  # the sampler's own inputs, besides the conditions
SAMPLER_OUTPUT = "samples"


class Ident(str):
    """An enum value in protobuf text format (written without quotes)."""


def _scalar(v: Any) -> str:
    if isinstance(v, Ident):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(v).__name__} {v!r} in a model config")


def to_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """``message`` in protobuf text format: dicts are messages, lists of dicts repeated messages."""
    pad, lines = "  " * indent, []
    for key, v in message.items():
        if isinstance(v, dict):
            body = to_pbtxt(v, indent + 1)
            lines.append(f"{pad}{key} {{\n{body}{pad}}}" if body else f"{pad}{key} {{ }}")
        elif isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
            items = ",\n".join(f"{pad}  {{\n{to_pbtxt(m, indent + 2)}{pad}  }}" for m in v)
            lines.append(f"{pad}{key} [\n{items}\n{pad}]")
        elif isinstance(v, list):
            inner = ", ".join(_scalar(x) for x in v)
            lines.append(f"{pad}{key}: [ {inner} ]" if inner else f"{pad}{key}: [ ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")
    return "".join(line + "\n" for line in lines)


def api_dims(spec: TensorSpec, batched: bool) -> tuple[list[int], list[int] | None]:
    """``(dims, reshape)`` of ``spec`` in a config: the batch dim is dropped when ``batched``
    (``max_batch_size > 0``); a per-sample scalar ([B]) is sent as [B, 1] and reshaped to [B]."""
    dims = list(spec.shape[1:] if batched else spec.shape)
    return ([1], []) if batched and not dims else (dims, None)


def _tensor(spec: TensorSpec, batched: bool, optional: bool = False) -> dict[str, Any]:
    if spec.dtype not in DATA_TYPES:
        raise ValueError(f"tensor '{spec.name}': dtype {spec.dtype!r} has no Triton type (expected {', '.join(DATA_TYPES)})")
    dims, reshape = api_dims(spec, batched)
    t: dict[str, Any] = {"name": spec.name, "data_type": Ident(DATA_TYPES[spec.dtype]), "dims": dims}
    if reshape is not None:
        t["reshape"] = {"shape": reshape}
    if optional:
        t["optional"] = True
    return t


def _parameters(params: dict[str, str]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"string_value": v}} for k, v in params.items()]


def denoiser_config(
    name: str, io: IOSpec, *, platform: str | None = None, instances: int = 1, gpu: bool = False,
    parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The denoiser ``name``: batched (``max_batch_size`` = ``io.batch["max"]``) with dynamic batching.

    ``platform`` is ``tensorrt_plan`` or ``onnxruntime_onnx``; ``None`` makes it a Python model.
    """
    cfg: dict[str, Any] = {"name": name}
    cfg.update({"platform": platform} if platform else {"backend": "python"})
    cfg["max_batch_size"] = int(io.batch.get("max", 1))
    cfg["input"] = [_tensor(s, batched=True) for s in io.inputs]
    cfg["output"] = [_tensor(s, batched=True) for s in io.outputs]
    cfg["dynamic_batching"] = {}
    cfg["instance_group"] = [{"count": instances, "kind": Ident("KIND_GPU" if gpu else "KIND_CPU")}]
    if parameters:
        cfg["parameters"] = _parameters(parameters)
    return cfg


def sampler_io(io: IOSpec, image_hw: Sequence[int] | None = None) -> IOSpec:
    """The sampler's contract: ``latents`` like ``x``, the engine's conditions, optional ``seed`` → ``samples``.

    With patching, ``image_hw`` (the sampler's ``patching.img_shape``) replaces the patch size of
    ``latents``, ``samples`` and image conditions: clients send whole images.
    """

    def whole(s: TensorSpec, name: str, kind: str) -> TensorSpec:
        shape = list(s.shape) if image_hw is None or len(s.shape) != 4 else [*s.shape[:2], *image_hw]
        return TensorSpec(name, shape, s.dtype, kind)

    x = next(s for s in io.inputs if s.kind == "x")
    conditions = [whole(s, s.name, s.kind) for s in io.inputs if s.kind not in ("x", "sigma", "global_index")]  # the sampler fills global_index
    inputs = [whole(x, "latents", "latents"), *conditions, TensorSpec("seed", [1], "int64", "seed")]
    return IOSpec(inputs, [whole(x, SAMPLER_OUTPUT, "samples")], dict(io.batch))


def sampler_config(name: str, io: IOSpec, *, instances: int = 1, parameters: dict[str, str] | None = None,
                   image_hw: Sequence[int] | None = None) -> dict[str, Any]:
    """The Python sampler ``name``: unbatched config (``max_batch_size: 0``, dims with -1 for the
    batch) so each request is one full sampling run; ``seed`` is optional."""
    sio = sampler_io(io, image_hw)
    cfg: dict[str, Any] = {"name": name, "backend": "python", "max_batch_size": 0}
    cfg["input"] = [_tensor(s, batched=False, optional=s.kind == "seed") for s in sio.inputs]
    cfg["output"] = [_tensor(s, batched=False) for s in sio.outputs]
    cfg["instance_group"] = [{"count": instances, "kind": Ident("KIND_CPU")}]
    if parameters:
        cfg["parameters"] = _parameters(parameters)
    return cfg
