"""Triton Python model ``<name>_denoiser`` of the self-contained repository: the engine in-process.

Requests gathered by the dynamic batcher are concatenated along the batch, run as one engine
call and split back, one response per request. ``initialize`` refuses an engine whose parity
verdict is not ok (unless the config allows it), so Triton does not serve it. Shipped as
``1/model.py`` by ``diffexport.deploy.triton.write_repository``; runs inside Triton's Python stub.
"""

import torch
import triton_python_backend_utils as pb_utils

from diffexport.deploy.triton.backend import (
    check_sigma,
    check_verified,
    engine_dir,
    error_response,
    output_response,
    parameters,
    read_inputs,
)
from diffexport.engines import load
from diffexport.engines.manifest import read_manifest


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        backend = parameters(args)["backend"]
        allow = check_verified(args, read_manifest(engine_dir(args)), backend)
        device = f"cuda:{args['model_instance_device_id']}" if args.get("model_instance_kind") == "GPU" else "cpu"
        self.engine = load(engine_dir(args), backend, device, allow_unverified=allow)
        self.io = self.engine.io
        self.sigma = next(s.name for s in self.io.inputs if s.kind == "sigma")

    def execute(self, requests: list) -> list:
        batches, responses = [], [None] * len(requests)
        for i, r in enumerate(requests):  # a bad request fails alone
            try:
                b = read_inputs(pb_utils, r, self.io.inputs, copy=False)
                check_sigma(b[self.sigma])
                batches.append((i, b))
            except Exception as e:
                responses[i] = error_response(pb_utils, e)
        if batches:
            try:
                sizes = [b["x"].shape[0] for _, b in batches]
                inputs = {s.name: torch.cat([b[s.name] for _, b in batches]) for s in self.io.inputs}
                with torch.inference_mode():
                    denoised = self.engine(**inputs)
                name = self.io.outputs[0].name
                for (i, _), part in zip(batches, torch.split(denoised, sizes)):
                    responses[i] = output_response(pb_utils, {name: part})
            except Exception as e:  # every request of the failed batch gets the error
                for i, _ in batches:
                    responses[i] = error_response(pb_utils, e)
        return responses
