"""Triton Python model ``<name>_sampler``: full sampling runs, concurrent requests together.

``latents`` (x at the first time step: ε·α(t₀)σ(t₀), σ_max·ε for EDM/VE) and the conditions in, ``samples`` out; the optional ``seed`` (one
per sample, or one for the request; default 0 like ``diffexport sample``) seeds a stochastic
solver's noise; the optional request parameter ``num_steps`` re-discretises the schedule. The dynamic batcher hands ``execute`` the requests that arrived together; they
are merged into batched runs of up to the engine's max batch (same settings only) and each keeps
its own noise generators, so its samples equal those of the request sampled alone. The loop is
diffexport's runtime sampler with the schedule of the engine's ``manifest.json``; each denoiser
evaluation is one BLS request to ``<name>_denoiser``. ``initialize`` refuses an engine whose
parity verdict is not ok (unless the config allows it). Shipped as ``1/model.py``.
"""

import triton_python_backend_utils as pb_utils

from diffexport.deploy.triton.backend import (
    BLSEngine,
    batched_runs,
    check_verified,
    decode_sampler_request,
    engine_dir,
    error_response,
    output_response,
    parameters,
    sample_together,
)
from diffexport.deploy.triton.config import SAMPLER_OUTPUT, max_batch, sampler_io
from diffexport.engines.manifest import read_manifest
from diffexport.recipes import IOSpec
from diffexport.runtime.sampler import SamplerSpec, sample


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        manifest = read_manifest(engine_dir(args))
        check_verified(args, manifest, parameters(args).get("denoiser_backend"))  # the denoiser's artifact (a native model has no initialize of ours)
        io = IOSpec.from_dict(manifest["io"])
        self.engine = BLSEngine(pb_utils, parameters(args)["denoiser_model"], io)
        self.spec = SamplerSpec.from_manifest(manifest["sampler"])
        self.inputs = sampler_io(io, (manifest["sampler"].get("patching") or {}).get("img_shape")).inputs
        self.max_rows = max_batch(io)

    def _sample(self, **kw):
        return sample(self.engine, self.spec, **kw)

    def execute(self, requests: list) -> list:
        decoded, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                decoded.append(decode_sampler_request(pb_utils, request, self.inputs))
            except Exception as e:  # this request fails, the others are served
                decoded.append(e)
                responses[i] = error_response(pb_utils, e)
        for run in batched_runs(decoded, self.max_rows):
            try:
                parts = sample_together([decoded[i] for i in run], self._sample)
                for i, samples in zip(run, parts):
                    responses[i] = output_response(pb_utils, {SAMPLER_OUTPUT: samples})
            except Exception as e:  # retried one by one, so only the request at fault fails
                for i in run:
                    try:
                        samples = sample_together([decoded[i]], self._sample)[0] if len(run) > 1 else None
                        responses[i] = output_response(pb_utils, {SAMPLER_OUTPUT: samples}) if samples is not None else error_response(pb_utils, e)
                    except Exception as alone:
                        responses[i] = error_response(pb_utils, alone)
        return responses
