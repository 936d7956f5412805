"""Engines: build a recipe into an engine directory, load it back behind one call.

>>> result = build_engine("recipes/quickstart.yaml")           # engines/quickstart/
>>> engine = load(result.engine_dir, backend="onnxruntime")     # or "aoti", "tensorrt", "torch"
>>> denoised = engine(x, sigma)
"""

from __future__ import annotations

from diffexport.engines.base import Engine, EngineError, check_inputs
from diffexport.engines.build import BuildResult, build_engine
from diffexport.engines.load import BACKENDS, load
from diffexport.engines.manifest import mark, read_manifest

__all__ = ["BACKENDS", "BuildResult", "Engine", "EngineError", "build_engine", "check_inputs", "load", "mark", "read_manifest"]
