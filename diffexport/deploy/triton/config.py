"""``config.pbtxt`` for the two Triton models of an engine: the denoiser and the sampler.

Configs are Triton's own ``ModelConfig`` protobuf messages (``tritonclient.grpc.model_config_pb2``,
the ``[triton]`` extra), written with protobuf's ``text_format``. A backend that needs other
fields (e.g. an OpenVINO denoiser) adds a ``platform``/``backend`` here and fills the same
message; :func:`instance_groups` and :func:`_tensor` are shared by every model kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from diffexport.recipes import IOSpec, TensorSpec

DATA_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}
SAMPLER_INPUTS = ("latents", "seed")  # the sampler's own inputs, besides the conditions
SAMPLER_OUTPUT = "samples"
# How long the sampler's dynamic batcher waits for more requests to fill a batch (the recipe's
# deploy.triton_queue_delay_ms, default 20 ms). It must exceed a client's turnaround between a
# response and its next request: with 2 ms, 8 closed-loop HTTP clients on the quickstart split into
# groups that never met again (3.2 requests per execute); with 20 ms every execute held all 8.
QUEUE_DELAY_MS = 20.0
EXTRA_HINT = "install the [triton] extra: pip install 'diffexport[triton]' (tritonclient provides Triton's model config schema)"


def pb2() -> ModuleType:
    """Triton's ``model_config_pb2`` (from ``tritonclient[grpc]``); ``ImportError`` naming the extra."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise ImportError(f"{EXTRA_HINT} ({e})") from None
    return model_config_pb2


def to_pbtxt(config: Any) -> str:
    """A ``ModelConfig`` message in protobuf text format (what ``config.pbtxt`` holds)."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def parse_pbtxt(text: str) -> Any:
    """``config.pbtxt`` text -> ``ModelConfig``."""
    from google.protobuf import text_format

    return text_format.Parse(text, pb2().ModelConfig())


@dataclass(frozen=True)
class Instances:
    """How many copies of a model Triton runs, and where: ``count`` on the CPU, or ``count`` on each
    of ``gpus`` (device ids). ``gpu=True`` without ids: ``count`` on every visible GPU."""

    count: int = 1
    gpus: tuple[int, ...] = ()
    gpu: bool = False

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"--instances: must be at least 1, got {self.count}")
        if any(g < 0 for g in self.gpus):
            raise ValueError(f"--gpus: device ids must be >= 0, got {list(self.gpus)}")

    @property
    def on_gpu(self) -> bool:
        return self.gpu or bool(self.gpus)


def instance_groups(config: Any, instances: Instances) -> None:
    """Append ``instances`` to ``config.instance_group`` (one group: ``count`` per listed GPU, or on the CPU)."""
    group = config.instance_group.add()
    group.count = instances.count
    group.kind = pb2().ModelInstanceGroup.KIND_GPU if instances.on_gpu else pb2().ModelInstanceGroup.KIND_CPU
    group.gpus.extend(instances.gpus)


def api_dims(spec: TensorSpec, batched: bool) -> tuple[list[int], list[int] | None]:
    """``(dims, reshape)`` of ``spec`` in a config: the batch dim is dropped when ``batched``
    (``max_batch_size > 0``); a per-sample scalar ([B]) is sent as [B, 1] and reshaped to [B]."""
    dims = list(spec.shape[1:] if batched else spec.shape)
    return ([1], []) if batched and not dims else (dims, None)


def _tensor(container: Any, spec: TensorSpec, batched: bool, optional: bool = False) -> None:
    if spec.dtype not in DATA_TYPES:
        raise ValueError(f"tensor '{spec.name}': dtype {spec.dtype!r} has no Triton type (expected {', '.join(DATA_TYPES)})")
    dims, reshape = api_dims(spec, batched)
    t = container.add(name=spec.name, data_type=pb2().DataType.Value(DATA_TYPES[spec.dtype]), dims=dims)
    if reshape is not None:
        t.reshape.shape.extend(reshape)
    if optional:
        t.optional = True


def _parameters(config: Any, params: dict[str, str] | None) -> None:
    for k, v in (params or {}).items():
        config.parameters[k].string_value = v


def max_batch(io: IOSpec) -> int:
    """The engine's ``inputs.batch.max``: every config's ``max_batch_size`` (Triton refuses larger batches)."""
    return max(1, int(io.batch.get("max", 1)))


def _dynamic_batching(config: Any, io: IOSpec, delay_ms: float | None) -> None:
    """Dynamic batching up to the engine's max batch. With ``delay_ms``: prefer its ``opt`` and
    ``max`` sizes, waiting up to that long for them (the sampler: a run takes many denoiser calls);
    ``None``: batch whatever is queued without waiting (the denoiser: one call per sampler step)."""
    config.dynamic_batching.SetInParent()
    if delay_ms is None:
        return
    top = max_batch(io)
    preferred = sorted({min(top, max(1, int(io.batch.get("opt", top)))), top})
    config.dynamic_batching.preferred_batch_size.extend(preferred)
    config.dynamic_batching.max_queue_delay_microseconds = round(delay_ms * 1000)


def denoiser_config(
    name: str, io: IOSpec, *, platform: str | None = None, instances: Instances = Instances(),
    parameters: dict[str, str] | None = None, model_file: str | None = None,
) -> Any:
    """The denoiser ``name``: batched (``max_batch_size`` = ``io.batch["max"]``) with dynamic batching.

    ``platform`` is ``tensorrt_plan`` or ``onnxruntime_onnx`` (a Triton platform), ``openvino``
    (Triton's OpenVINO backend, reading ``model_file``), or ``None``: a Python model.
    """
    cfg = pb2().ModelConfig(name=name, max_batch_size=max_batch(io))
    if platform in ("openvino", None):
        cfg.backend = platform or "python"
    else:
        cfg.platform = platform
    if model_file:
        cfg.default_model_filename = model_file
    for s in io.inputs:
        _tensor(cfg.input, s, batched=True)
    for s in io.outputs:
        _tensor(cfg.output, s, batched=True)
    _dynamic_batching(cfg, io, None)
    instance_groups(cfg, instances)
    _parameters(cfg, parameters)
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
    inputs = [whole(x, "latents", "latents"), *conditions, TensorSpec("seed", [-1], "int64", "seed")]
    return IOSpec(inputs, [whole(x, SAMPLER_OUTPUT, "samples")], dict(io.batch))


def sampler_config(name: str, io: IOSpec, *, instances: Instances = Instances(), parameters: dict[str, str] | None = None,
                   image_hw: Sequence[int] | None = None, batching: bool = True, queue_delay_ms: float = QUEUE_DELAY_MS) -> Any:
    """The Python sampler ``name``: batched like the denoiser (``max_batch_size`` = the engine's max
    batch, dynamic batching), so concurrent requests reach one ``execute`` and are sampled together;
    ``seed`` ([B, 1], one per sample; one per request is the request parameter ``seed``) is optional. The sampler itself runs
    on the CPU (its work is the BLS calls), so only its count follows ``instances``. The batcher
    waits up to ``queue_delay_ms`` for a fuller batch; ``batching=False`` (benchmarks) leaves
    dynamic batching off: one request per ``execute``."""
    sio = sampler_io(io, image_hw)
    cfg = pb2().ModelConfig(name=name, backend="python", max_batch_size=max_batch(io))
    for s in sio.inputs:
        _tensor(cfg.input, s, batched=True, optional=s.kind == "seed")
    for s in sio.outputs:
        _tensor(cfg.output, s, batched=True)
    if batching:
        _dynamic_batching(cfg, io, queue_delay_ms)
    instance_groups(cfg, Instances(instances.count))
    _parameters(cfg, parameters)
    return cfg
