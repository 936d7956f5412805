"""ONNX Runtime backend: ``denoiser.onnx`` in a tuned session, torch tensors bound by pointer."""

from __future__ import annotations

from pathlib import Path

import os

import numpy as np
import onnxruntime as ort
import torch

from diffexport.engines.base import EngineError, check_inputs
from diffexport.recipes import IOSpec

_NUMPY = {"float32": np.float32, "int64": np.int64}


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    allowed = os.sched_getaffinity(0)
    cores, cpu, physical = set(), None, "0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                physical = value
            elif key == "core id" and cpu in allowed:
                cores.add((physical, value))
    except OSError:
        pass
    return len(cores) or len(allowed)


def make_session(path: str | Path, threads: int | None = None, providers: list | None = None, *, spinning: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime session of the file ``path`` as it is on disk, tuned for one denoiser call at a time.

    One intra-op thread per physical core (``threads`` overrides), no inter-op parallelism, all
    graph optimisations (the NCHWc layout pass alone is 10-20% on x86). Worker threads do not
    spin between calls unless ``spinning``: on an idle 2-core machine spinning made no measurable
    difference, on a shared one it cost 20%. ``providers`` default to CUDA when this onnxruntime
    has it, then CPU (pass ``TensorrtExecutionProvider`` explicitly). The model is not rewritten
    in memory: what runs is the file the manifest hashes (the exporter already wrote it in the
    form ONNX Runtime runs fastest, see :mod:`diffexport.export.onnx`).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return ort.InferenceSession(str(path), options, providers=providers)


class OnnxRuntimeEngine:
    """``engine(x, sigma, **conditions) -> denoised`` through an ONNX Runtime session.

    Inputs and the output are bound by address (I/O binding), so torch tensors reach the session
    without copies; the session options come from :func:`make_session`.
    ``device`` is CUDA when the CUDA execution provider leads the session's providers.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | Path, io: IOSpec, *, threads: int | None = None, providers: list | None = None, spinning: bool = False):
        self.path, self.io = Path(path), io
        try:
            self.session = make_session(self.path, threads=threads, providers=providers, spinning=spinning)
        except Exception as e:  # onnxruntime raises its own exception types with long messages
            raise EngineError(f"{self.path}: ONNX Runtime cannot load the model: {str(e).strip().splitlines()[0]}") from e
        names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        want = [s.name for s in io.inputs], [s.name for s in io.outputs]
        if names != want:
            raise EngineError(f"{self.path}: model inputs/outputs {names} do not match the manifest's {want}")
        cuda = self.session.get_providers()[0] == "CUDAExecutionProvider"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def _bind(self, binding, name: str, t: torch.Tensor, output: bool = False) -> None:
        where = (self.device.type, self.device.index or 0, _NUMPY[str(t.dtype).removeprefix("torch.")])
        bind = binding.bind_output if output else binding.bind_input
        bind(name, *where, tuple(t.shape), t.data_ptr())

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        inputs = [t.to(self.device).contiguous() for t in check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})]
        binding = self.session.io_binding()
        for spec, t in zip(self.io.inputs, inputs):  # ``inputs`` keeps the memory alive until run
            self._bind(binding, spec.name, t)
        outputs = [torch.empty((x.shape[0], *s.shape[1:]), dtype=torch.float32, device=self.device) for s in self.io.outputs]
        for spec, t in zip(self.io.outputs, outputs):
            self._bind(binding, spec.name, t, output=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch must be ready
        self.session.run_with_iobinding(binding)
        return outputs[0]
