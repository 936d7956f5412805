"""Triton Inference Server deployment: model repositories for an engine, and the server process.

``write_repository(engine_dir)`` writes ``ENGINE_DIR/triton`` (denoiser in Triton's ONNX Runtime /
TensorRT backend) or ``ENGINE_DIR/triton-python`` (``python_only``: everything in the Python
backend); both hold ``<name>_denoiser`` and ``<name>_sampler``. ``TritonServer`` runs the
``tritonserver`` of the ``[triton]`` extra on one. The Python-backend model sources are in
``models/`` (shipped as ``1/model.py``; they import :mod:`.backend` inside the server).
"""

from diffexport.deploy.triton.repository import (
    model_names,
    native_target,
    python_backend,
    python_only_reason,
    repository_dir,
    triton_stage,
    write_repository,
)
from diffexport.deploy.triton.server import TritonError, TritonServer, available_backends, backend_directory, triton_home

__all__ = [
    "write_repository", "triton_stage", "repository_dir", "model_names", "native_target", "python_backend", "python_only_reason",
    "TritonServer", "TritonError", "available_backends", "backend_directory", "triton_home",
]
