"""Engines: build a recipe into an engine directory, load it back behind one call.

>>> result = build_engine("recipes/quickstart.yaml")           # engines/quickstart/
>>> engine = load(result.engine_dir, backend="onnxruntime")     # or "aoti", "tensorrt", "torch"
>>> denoised = engine(x, sigma)

``build_engine`` and ``BuildResult`` are imported on first use (PEP 562 ``__getattr__``): loading
and running an engine never imports the exporter (``diffexport.export``'s lowering, torch.onnx,
onnxscript, TensorRT).
"""

from __future__ import annotations

from diffexport.engines.base import Engine, EngineError, check_inputs
from diffexport.engines.load import BACKENDS, load
from diffexport.engines.manifest import mark, read_manifest
from diffexport.lazy import lazy_getattr

_LAZY = {"BuildResult": "build", "build_engine": "build"}

__all__ = ["BACKENDS", "BuildResult", "Engine", "EngineError", "build_engine", "check_inputs", "load", "mark", "read_manifest"]


__getattr__ = lazy_getattr(__name__, _LAZY)
