"""What the Python-backend models share: parameters, the verdict check, request decoding and
validation, responses, :class:`BLSEngine` (the denoiser model, called through BLS, as an
``Engine``) and the merging of concurrent sampler requests into batched runs.

Imported inside Triton's Python stub. ``pb_utils`` (``triton_python_backend_utils``, which exists
only there) is passed in, so this module imports without Triton.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch.utils.dlpack import from_dlpack, to_dlpack

from diffexport.deploy.triton.config import api_dims
from diffexport.engines.base import EngineError, check_inputs
from diffexport.engines.verdict import require_verified
from diffexport.recipes import IOSpec, TensorSpec

ALLOW_PARAM = "allow_unverified"  # config parameter "true": serve an engine whose parity verdict is not ok


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


def check_verified(args: dict[str, str], manifest: dict, backend: str | None = None) -> bool:
    """``initialize``'s verdict check: ``UnverifiedEngine`` (the one-line refusal of
    :mod:`diffexport.engines.verdict`) unless the engine is verified or the config allows it;
    returns whether the config allows it (for ``engines.load``)."""
    allow = parameters(args).get(ALLOW_PARAM, "false") == "true"
    require_verified(engine_dir(args), manifest, backend, allow_unverified=allow)
    return allow


def _as_torch(t: Any, copy: bool) -> torch.Tensor:
    """A Triton tensor as torch, through DLPack (no copy) when possible; ``copy`` when the caller
    may modify it (Triton's buffers are read-only)."""
    try:
        out = from_dlpack(t.to_dlpack())
    except Exception:  # a backend or type without DLPack: through numpy
        return torch.from_numpy(t.as_numpy().copy())
    return out.clone() if copy else out


def read_inputs(pb: ModuleType, request: Any, specs: list[TensorSpec], *, copy: bool = True) -> dict[str, torch.Tensor]:
    """The request's tensors named in ``specs`` as torch tensors. A missing required input (any
    but ``seed``) is a ``ValueError`` naming it; absent optional ones are left out."""
    tensors = {}
    for spec in specs:
        t = pb.get_input_tensor_by_name(request, spec.name)
        if t is not None:
            tensors[spec.name] = _as_torch(t, copy)
        elif spec.kind != "seed":
            raise ValueError(f"input '{spec.name}' is missing (the model takes {', '.join(s.name for s in specs)})")
    return tensors


def check_sigma(sigma: torch.Tensor, name: str = "sigma") -> None:
    """Refuse noise levels the denoiser is not defined for: every σ must be finite and > 0."""
    bad = ~(torch.isfinite(sigma) & (sigma > 0))
    if bool(bad.any()):
        raise ValueError(f"input '{name}' must be finite and > 0, got {sigma[bad].flatten()[:4].tolist()}")


def output_response(pb: ModuleType, outputs: dict[str, torch.Tensor]) -> Any:
    return pb.InferenceResponse([_to_triton(pb, name, t) for name, t in outputs.items()])


def _to_triton(pb: ModuleType, name: str, t: torch.Tensor) -> Any:
    t = t.detach().contiguous()
    try:
        return pb.Tensor.from_dlpack(name, to_dlpack(t))
    except Exception:  # an older Python backend without from_dlpack
        return pb.Tensor(name, t.cpu().numpy())


def error_response(pb: ModuleType, error: BaseException) -> Any:
    """The error as a response: a bad request (``ValueError``, ``EngineError``) is the client's
    error (HTTP 400, INVALID_ARG), anything else the server's."""
    message = f"{type(error).__name__}: {error}"
    code = getattr(pb.TritonError, "INVALID_ARG" if isinstance(error, (ValueError, EngineError)) else "INTERNAL", None)
    return pb.InferenceResponse(error=pb.TritonError(message) if code is None else pb.TritonError(message, code))


class BLSEngine:
    """``Engine`` whose call is a BLS request to the Triton model ``model_name`` (the denoiser).

    Inputs are checked against ``io`` first; per-sample scalars ([B]) travel as [B, 1] like any
    client request to the batched denoiser (its config reshapes them back). Tensors go both ways
    through DLPack, without host numpy copies.
    """

    backend = "triton"

    def __init__(self, pb: ModuleType, model_name: str, io: IOSpec) -> None:
        self.pb, self.model_name, self.io, self.device = pb, model_name, io, torch.device("cpu")

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        tensors = check_inputs(self.io, self.backend, {"x": x, "sigma": sigma, **conditions})
        inputs = [_to_triton(self.pb, s.name, t.reshape(t.shape[0], *api_dims(s, batched=True)[0]))
                  for s, t in zip(self.io.inputs, tensors)]
        output = self.io.outputs[0].name
        response = self.pb.InferenceRequest(model_name=self.model_name, requested_output_names=[output], inputs=inputs).exec()
        if response.has_error():
            raise EngineError(f"Triton model '{self.model_name}': {response.error().message()}")
        return _as_torch(self.pb.get_output_tensor_by_name(response, output), copy=False)


# --- the sampler: concurrent requests sampled together ------------------------------------------


MAX_STEPS = 1000  # the most sampler steps a request may ask for (request parameter ``num_steps``)


@dataclass
class SamplerRequest:
    """One decoded sampler request: its latents and conditions ([B, ...]), its seeds and its
    settings (requests are merged only with requests of the same settings)."""

    latents: torch.Tensor
    conditions: dict[str, torch.Tensor]
    seeds: list[int]  # one per sample, or one for the whole request
    num_steps: int | None = None  # None: the manifest's

    @property
    def settings(self) -> tuple:
        return (self.num_steps,)

    @property
    def rows(self) -> int:
        return int(self.latents.shape[0])


MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range, as `diffexport sample --seed`


def decode_sampler_request(pb: ModuleType, request: Any, specs: list[TensorSpec]) -> SamplerRequest:
    """``latents``, conditions and seeds of a request: the input ``seed`` holds one value per sample
    ([B, 1]; Triton requires every input of a batched model to have the request's batch size), the
    request parameter ``seed`` one for the whole request; without either the request is seeded 0,
    like ``diffexport sample``."""
    t = read_inputs(pb, request, specs)
    latents, seed = t.pop("latents"), t.pop("seed", None)
    if latents.ndim != 4 or latents.shape[0] < 1:
        raise ValueError(f"input 'latents' must be [B, C, H, W] with B >= 1, got {list(latents.shape)}")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("input 'latents' holds NaN or Inf values")
    param = _int_parameter(request, "seed", 0, MAX_SEED)
    if seed is not None and param is not None:
        raise ValueError("give the seed as the input 'seed' (one per sample) or the request parameter 'seed', not both")
    seeds = [0 if param is None else param] if seed is None else [int(s) for s in seed.flatten().tolist()]
    if len(seeds) not in (1, latents.shape[0]):
        raise ValueError(f"input 'seed' must hold 1 or {latents.shape[0]} values (one per sample), got {len(seeds)}")
    return SamplerRequest(latents, t, seeds, _int_parameter(request, "num_steps", 1, MAX_STEPS))


def _int_parameter(request: Any, name: str, low: int, high: int) -> int | None:
    """The optional integer request parameter ``name`` (``num_steps`` re-discretises the engine's
    schedule, ``seed`` seeds the whole request); ``ValueError`` outside ``[low, high]``."""
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):
        return None
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"request parameter '{name}' must be an integer in [{low}, {high}], got {value!r}")
    return value


def batched_runs(requests: Sequence[SamplerRequest | BaseException], max_rows: int) -> list[list[int]]:
    """Indices of the decoded ``requests`` sampled together: same settings, at most ``max_rows``
    rows per run, in arrival order (a request is never split; failed decodes are left out)."""
    runs: list[list[int]] = []
    open_runs: dict[tuple, list[int]] = {}
    rows: dict[int, int] = {}
    for i, r in enumerate(requests):
        if isinstance(r, BaseException):
            continue
        run = open_runs.get(r.settings)
        if run is None or rows[id(run)] + r.rows > max_rows:
            run = []
            runs.append(run)
            open_runs[r.settings] = run
            rows[id(run)] = 0
        run.append(i)
        rows[id(run)] += r.rows
    return runs


def sample_together(run: Sequence[SamplerRequest], sample_fn: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
    """Sample the requests of one run as one batch and split the samples back per request.

    ``sample_fn(latents=, conditions=, seed=, seed_rows=, num_steps=)`` is the runtime sampler; each request
    keeps its own noise stream(s) (``seed_rows``), so its samples do not depend on the others.
    """
    seeds, seed_rows = [], []
    for r in run:
        if len(r.seeds) == 1:
            seeds.append(r.seeds[0])
            seed_rows.append(r.rows)
        else:
            seeds.extend(r.seeds)
            seed_rows.extend([1] * r.rows)
    latents = torch.cat([r.latents for r in run])
    conditions = {name: torch.cat([r.conditions[name] for r in run]) for name in run[0].conditions}
    samples = sample_fn(latents=latents, conditions=conditions, seed=seeds, seed_rows=seed_rows, num_steps=run[0].num_steps)
    return list(torch.split(samples, [r.rows for r in run]))
