"""What the Python-backend models share: parameters, request decoding, responses, and
:class:`BLSEngine` (the denoiser model, called through BLS, as an ``Engine``).

Imported inside Triton's Python stub. ``pb_utils`` (``triton_python_backend_utils``, which exists
only there) is passed in, so this module imports without Triton.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from diffexport.deploy.triton.config import api_dims
from diffexport.engines.base import EngineError, check_inputs
from diffexport.recipes import IOSpec, TensorSpec


def parameters(args: dict[str, str]) -> dict[str, str]:
    """The ``parameters`` of the model's config (``initialize``'s ``args``) as plain strings."""
    params = json.loads(args["model_config"]).get("parameters", {})
    return {k: v["string_value"] for k, v in params.items()}


def engine_dir(args: dict[str, str]) -> Path:
    """The engine directory: the ``engine_dir`` parameter, relative to the model's folder."""
    rel = parameters(args).get("engine_dir")
    if rel is None:
        raise ValueError(f"model '{args['model_name']}': config.pbtxt has no 'engine_dir' parameter")
    return (Path(args["model_repository"]) / rel).resolve()


def read_inputs(pb: ModuleType, request: Any, specs: list[TensorSpec]) -> dict[str, torch.Tensor]:
    """The request's tensors named in ``specs`` (absent optional ones are left out), as torch tensors."""
    tensors = {}
    for spec in specs:
        t = pb.get_input_tensor_by_name(request, spec.name)
        if t is not None:
            tensors[spec.name] = torch.from_numpy(np.array(t.as_numpy()))  # copy: Triton's buffer is read-only
    return tensors


def output_response(pb: ModuleType, outputs: dict[str, torch.Tensor]) -> Any:
    return pb.InferenceResponse([pb.Tensor(name, t.detach().cpu().contiguous().numpy()) for name, t in outputs.items()])


def error_response(pb: ModuleType, error: BaseException) -> Any:
    return pb.InferenceResponse(error=pb.TritonError(f"{type(error).__name__}: {error}"))


class BLSEngine:
    """``Engine`` whose call is a BLS request to the Triton model ``model_name`` (the denoiser).

    Inputs are checked against ``io`` first; per-sample scalars ([B]) travel as [B, 1] like any
    client request to the batched denoiser (its config reshapes them back).
    """

    backend = "triton"

    def __init__(self, pb: ModuleType, model_name: str, io: IOSpec) -> None:
        self.pb, self.model_name, self.io, self.device = pb, model_name, io, torch.device("cpu")

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        tensors = check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})
        inputs = [
            self.pb.Tensor(s.name, t.detach().cpu().contiguous().numpy().reshape(t.shape[0], *api_dims(s, batched=True)[0]))
            for s, t in zip(self.io.inputs, tensors)
        ]
        output = self.io.outputs[0].name
        response = self.pb.InferenceRequest(model_name=self.model_name, requested_output_names=[output], inputs=inputs).exec()
        if response.has_error():
            raise EngineError(f"Triton model '{self.model_name}': {response.error().message()}")
        return torch.from_numpy(np.array(self.pb.get_output_tensor_by_name(response, output).as_numpy()))
