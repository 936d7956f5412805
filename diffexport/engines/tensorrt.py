"""TensorRT backend: a serialized ``denoiser.plan`` run on the current CUDA stream.

Inputs are torch CUDA tensors bound by pointer (no copies through host memory); the output is a
torch tensor allocated on the same device. A plan is specific to a GPU architecture and a
TensorRT version, both recorded in the manifest and checked before deserializing; the plan's I/O
tensors must be the manifest's names, directions and (inputs) dtypes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.engines.base import EngineError, check_inputs
from diffexport.recipes import IOSpec

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32, "INT64": torch.int64}
_MANIFEST = {"float32": "FLOAT", "int64": "INT64"}  # manifest dtype -> TensorRT DataType name


def import_tensorrt():
    """The ``tensorrt`` module, or ``EngineError`` naming the missing package."""
    try:
        import tensorrt
    except ImportError as e:
        raise EngineError(
            f"the TensorRT backend needs the Python package 'tensorrt' (and a CUDA GPU): {e}; "
            "install NVIDIA TensorRT or use backend 'onnxruntime' / 'aoti'"
        ) from None
    return tensorrt


class TensorRTEngine:
    """Deserialize ``path`` once; each call sets the input shapes, binds pointers and enqueues
    ``execute_async_v3`` on ``torch.cuda.current_stream()``."""

    backend = "tensorrt"

    def __init__(self, path: str | Path, io: IOSpec, device: str | torch.device | None = None, compute_capability: str | None = None,
                 built_with: str | None = None):
        trt = import_tensorrt()
        self.io, self.path = io, Path(path)
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise EngineError(f"{self.path}: a TensorRT plan runs on a CUDA device, got {self.device} (CUDA available: {torch.cuda.is_available()})")
        have = "{}.{}".format(*torch.cuda.get_device_capability(self.device))
        if compute_capability and have != compute_capability:
            raise EngineError(f"{self.path}: plan built for compute capability {compute_capability}, this GPU is {have}; rebuild the engine here")
        if built_with and built_with != trt.__version__:  # a plan runs only on the TensorRT version that built it
            raise EngineError(f"{self.path}: plan built with TensorRT {built_with}, this is TensorRT {trt.__version__}; rebuild the engine here")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        with torch.cuda.device(self.device):
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise EngineError(f"{self.path}: TensorRT could not deserialize the plan (built by another TensorRT version or GPU?)")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise EngineError(f"{self.path}: TensorRT could not create an execution context (out of GPU memory?)")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        want = [s.name for s in (*io.inputs, *io.outputs)]
        if sorted(names) != sorted(want):
            raise EngineError(f"{self.path}: plan tensors {names} do not match the manifest's {want}")
        for spec, mode in [*((s, "INPUT") for s in io.inputs), *((s, "OUTPUT") for s in io.outputs)]:
            got = self._engine.get_tensor_mode(spec.name).name, self._engine.get_tensor_dtype(spec.name).name
            if got[0] != mode or (mode == "INPUT" and got[1] != _MANIFEST[spec.dtype]):  # inputs are bound as the manifest's dtype
                raise EngineError(f"{self.path}: plan tensor '{spec.name}' is a {' '.join(got)} tensor, not the manifest's "
                                  f"{spec.dtype} {mode.lower()}")
        self._out_dtype = {s.name: _TORCH_DTYPES[self._engine.get_tensor_dtype(s.name).name] for s in io.outputs}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        inputs = check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})
        inputs = [t.to(self.device).contiguous() for t in inputs]  # kept alive until enqueued
        ctx = self._context
        for spec, t in zip(self.io.inputs, inputs):
            if not ctx.set_input_shape(spec.name, tuple(t.shape)):
                raise EngineError(f"tensorrt: input '{spec.name}' shape {list(t.shape)} is outside the plan's optimization profile")
            ctx.set_tensor_address(spec.name, t.data_ptr())
        outputs = []
        for spec in self.io.outputs:
            out = torch.empty(tuple(ctx.get_tensor_shape(spec.name)), dtype=self._out_dtype[spec.name], device=self.device)
            ctx.set_tensor_address(spec.name, out.data_ptr())
            outputs.append(out)
        with torch.cuda.device(self.device):
            if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
                raise EngineError(f"{self.path}: TensorRT execution failed (see the TensorRT log above)")
        return outputs[0].float()
