"""Run engines: the sampler of an engine's manifest over any backend, batched, patched, guarded.

>>> engine = diffexport.engines.load("engines/quickstart", "onnxruntime")
>>> samples = sample(engine, read_manifest("engines/quickstart")["sampler"], batch=4, seed=0)
"""

from diffexport.runtime.batching import BatchedEngine, batch_range, clamp_batch
from diffexport.runtime.cuda_graphs import CUDAGraphEngine
from diffexport.runtime.guards import FiniteGuard, SamplingError
from diffexport.runtime.images import save_png_grid
from diffexport.runtime.sampler import SamplerSpec, check_conditions, engine_predictor, initial_latents, make_scheduler, sample

__all__ = [
    "BatchedEngine", "CUDAGraphEngine", "FiniteGuard", "SamplerSpec", "SamplingError", "batch_range", "check_conditions",
    "clamp_batch", "engine_predictor", "initial_latents", "make_scheduler", "sample", "save_png_grid",
]  # fmt: skip
