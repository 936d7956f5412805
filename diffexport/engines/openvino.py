"""OpenVINO backend: the compiled blob of the ``openvino`` target, imported into the CPU plugin.

Loading imports ``openvino`` only (no exporter). The blob is imported with the compile properties
its manifest record lists; when this OpenVINO cannot import it (another version), the record's
``source`` ONNX is compiled again with the same properties (slower, same result).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.engines.base import EngineError, check_inputs
from diffexport.recipes import IOSpec


def import_openvino():
    """The ``openvino`` module, or ``EngineError`` naming the missing package."""
    try:
        import openvino
    except ImportError as e:
        raise EngineError(f"the OpenVINO backend needs the Python package 'openvino' ({e}); pip install openvino") from None
    return openvino


class OpenVINOEngine:
    """``engine(x, sigma, **conditions) -> denoised`` through one OpenVINO infer request.

    Inputs are shared with OpenVINO without copies; the output is written straight into a torch
    tensor. ``threads`` sets ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, one per physical core).
    """

    backend = "openvino"

    def __init__(self, path: str | Path, io: IOSpec, record: dict, *, source: Path | None = None, threads: int | None = None):
        ov = import_openvino()
        self.path, self.io, self.device = Path(path), io, torch.device("cpu")
        config = dict(record.get("config") or {})
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        core = ov.Core()
        try:
            self.compiled = core.import_model(self.path.read_bytes(), record.get("device", "cpu").upper(), config)
        except Exception as e:  # another OpenVINO version: compile the ONNX it came from
            if source is None or not source.is_file():
                raise EngineError(f"{self.path}: OpenVINO {ov.get_version()} cannot import this blob (written by "
                                  f"{record.get('openvino', '?')}): {str(e).strip().splitlines()[0]}; rebuild the engine") from e
            self.compiled = core.compile_model(str(source), record.get("device", "cpu").upper(), config)
        names = [p.get_any_name() for p in self.compiled.inputs], [p.get_any_name() for p in self.compiled.outputs]
        want = [s.name for s in io.inputs], [s.name for s in io.outputs]
        if names != want:
            raise EngineError(f"{self.path}: model inputs/outputs {names} do not match the manifest's {want}")
        self._request = self.compiled.create_infer_request()
        self._tensor = ov.Tensor

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        inputs = [t.cpu().contiguous() for t in check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})]
        out = torch.empty((x.shape[0], *self.io.outputs[0].shape[1:]), dtype=torch.float32)
        request = self._request
        for i, t in enumerate(inputs):
            request.set_input_tensor(i, self._tensor(t.numpy(), shared_memory=True))
        request.set_output_tensor(0, self._tensor(out.numpy(), shared_memory=True))
        request.infer()
        return out
