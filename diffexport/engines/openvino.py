"""OpenVINO backend: the compiled blob of the ``openvino`` target, imported into the CPU plugin.

Loading imports ``openvino`` only (no exporter). Blobs are imported with the compile properties
their manifest record lists, and, when the record names ``weights`` (weightless blobs), with the
IR ``.bin`` they take their weights from; when this OpenVINO cannot import one (another version), the record's
``source`` ONNX is compiled again with the same properties and shape (slower, same result), once its
sha256 matches the manifest's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffexport.engines.base import EngineError, check_inputs
from diffexport.engines.manifest import MANIFEST, sha256_file
from diffexport.recipes import IOSpec


def import_openvino():
    """The ``openvino`` module, or ``EngineError`` naming the missing package."""
    try:
        import openvino
    except ImportError as e:
        raise EngineError(f"the OpenVINO backend needs the Python package 'openvino' ({e}); pip install openvino") from None
    return openvino


def check_port_names(path: Path, compiled, io: IOSpec) -> None:
    """``EngineError`` unless ``compiled``'s inputs and outputs carry the manifest's names in its order.

    A port may have several tensor names: with a static batch, OpenVINO's CPU plugin folds ops and
    merges names (DDPM U-Net: input ``x`` also named ``mul_247``, which ``get_any_name`` returned), so
    a port matches when the manifest's name is one of its names."""
    ports = [p.get_names() for p in compiled.inputs], [p.get_names() for p in compiled.outputs]
    want = [s.name for s in io.inputs], [s.name for s in io.outputs]
    if any(len(have) != len(names) or any(n not in h for n, h in zip(names, have)) for have, names in zip(ports, want)):
        shown = tuple([sorted(h) for h in have] for have in ports)
        raise EngineError(f"{path}: model inputs/outputs {shown} do not match the manifest's {want}")


class OpenVINOEngine:
    """``engine(x, sigma, **conditions) -> denoised`` through OpenVINO infer requests.

    A call whose batch has a static-shape blob (``record["static"]``: the recipe's min, opt and
    max batch) runs that one, imported on first use; any other batch runs the dynamic-batch blob.
    Inputs are shared with OpenVINO without copies; the output is written straight into a torch
    tensor. ``threads`` sets ``INFERENCE_NUM_THREADS`` (default: OpenVINO's, one per physical core).
    """

    backend = "openvino"

    def __init__(self, path: str | Path, io: IOSpec, record: dict, *, source: Path | None = None, source_sha256: str | None = None,
                 threads: int | None = None):
        self._ov = import_openvino()
        self.path, self.io, self.device, self.record, self.source = Path(path), io, torch.device("cpu"), record, source
        self.source_sha256 = source_sha256  # the manifest's hash of ``source``, checked before it is compiled
        self.config = dict(record.get("config") or {})
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core = self._ov.Core()
        self._static = {int(b): self.path.with_name(name) for b, name in (record.get("static") or {}).items()}
        weights = record.get("weights")  # weightless blobs (CACHE_MODE: OPTIMIZE_SIZE) read their weights from it
        self._import = {"ENABLE_WEIGHTLESS": True, "WEIGHTS_PATH": str(self.path.with_name(weights))} if weights else {}
        self._requests: dict[int | None, object] = {None: self._request(self.path, None)}

    def _request(self, path: Path, batch: int | None):
        """An infer request of the blob ``path`` (``batch``: its static batch, None: dynamic)."""
        device = self.record.get("device", "cpu").upper()
        try:
            compiled = self._core.import_model(path.read_bytes(), device, {**self.config, **self._import})
        except Exception as e:  # another OpenVINO version: compile the ONNX it came from
            if self.source is None or not self.source.is_file():
                raise EngineError(f"{path}: OpenVINO {self._ov.get_version()} cannot import this blob (written by "
                                  f"{self.record.get('openvino', '?')}): {str(e).strip().splitlines()[0]}; rebuild the engine") from e
            if self.source_sha256 is None or sha256_file(self.source) != self.source_sha256:
                raise EngineError(f"{self.source}: sha256 does not match {MANIFEST} (or is not recorded there); refusing to compile "
                                  "it in place of the blob; rebuild the engine") from e
            model = self._core.read_model(str(self.source))
            if batch is not None:
                model.reshape({p.get_any_name(): self._ov.PartialShape([batch, *p.get_partial_shape()[1:]]) for p in model.inputs})
            compiled = self._core.compile_model(model, device, self.config)
        check_port_names(path, compiled, self.io)
        return compiled.create_infer_request()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        inputs = [t.cpu().contiguous() for t in check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})]
        batch = x.shape[0]
        key = batch if batch in self._static else None
        if key not in self._requests:
            self._requests[key] = self._request(self._static[key], key)
        request, tensor = self._requests[key], self._ov.Tensor
        out = torch.empty((batch, *self.io.outputs[0].shape[1:]), dtype=torch.float32)
        for i, t in enumerate(inputs):
            request.set_input_tensor(i, tensor(t.numpy(), shared_memory=True))
        request.set_output_tensor(0, tensor(out.numpy(), shared_memory=True))
        request.infer()
        return out
