"""Triton Python model ``<name>_sampler``: a full sampling run per request.

``latents`` (noise at σ_max) and the conditions in, ``samples`` out; the optional ``seed`` seeds a
stochastic solver's noise (default 0, like ``diffexport sample``). The loop is diffexport's runtime
sampler with the schedule of the engine's ``manifest.json``; each denoiser evaluation is a BLS
request to ``<name>_denoiser``. Shipped as ``1/model.py`` by ``write_repository``.
"""

import torch
import triton_python_backend_utils as pb_utils

from diffexport.deploy.triton.backend import BLSEngine, engine_dir, error_response, output_response, parameters, read_inputs
from diffexport.deploy.triton.config import SAMPLER_OUTPUT, sampler_io
from diffexport.engines.manifest import read_manifest
from diffexport.recipes import IOSpec
from diffexport.runtime.sampler import SamplerSpec, sample


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        manifest = read_manifest(engine_dir(args))
        io = IOSpec.from_dict(manifest["io"])
        self.engine = BLSEngine(pb_utils, parameters(args)["denoiser_model"], io)
        self.spec = SamplerSpec.from_manifest(manifest["sampler"])
        self.inputs = sampler_io(io, (manifest["sampler"].get("patching") or {}).get("img_shape")).inputs

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                t = read_inputs(pb_utils, request, self.inputs)
                latents, seed = t.pop("latents"), t.pop("seed", torch.zeros(1, dtype=torch.int64))
                samples = sample(self.engine, self.spec, latents=latents, conditions=t, seed=int(seed.flatten()[0]))
                responses.append(output_response(pb_utils, {SAMPLER_OUTPUT: samples}))
            except Exception as e:  # this request fails, the model keeps serving
                responses.append(error_response(pb_utils, e))
        return responses
