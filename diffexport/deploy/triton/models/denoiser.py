"""Triton Python model ``<name>_denoiser`` of the self-contained repository: the engine in-process.

Requests gathered by the dynamic batcher are concatenated along the batch, run as one engine
call and split back, one response per request. Shipped as ``1/model.py`` by
``diffexport.deploy.triton.write_repository``; runs inside Triton's Python backend stub.
"""

import torch
import triton_python_backend_utils as pb_utils

from diffexport.deploy.triton.backend import engine_dir, error_response, output_response, parameters, read_inputs
from diffexport.engines import load


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.engine = load(engine_dir(args), parameters(args)["backend"])
        self.io = self.engine.io

    def execute(self, requests: list) -> list:
        try:
            batches = [read_inputs(pb_utils, r, self.io.inputs) for r in requests]
            sizes = [b["x"].shape[0] for b in batches]
            inputs = {s.name: torch.cat([b[s.name] for b in batches]) for s in self.io.inputs}
            with torch.inference_mode():
                denoised = self.engine(**inputs)
            name = self.io.outputs[0].name
            return [output_response(pb_utils, {name: part}) for part in torch.split(denoised, sizes)]
        except Exception as e:  # every request of the failed batch gets the error
            return [error_response(pb_utils, e) for _ in requests]
