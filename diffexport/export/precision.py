"""Precision decided in the graph: fp16/bf16 compute with fp32 normalisation and softmax.

TensorRT 11 builds only strongly typed networks, so the exported graph itself must say which op
runs in which dtype; ONNX Runtime and TensorRT then run the same graph. :func:`mixed_precision`
is active while ``torch.export`` traces the denoiser and inserts explicit casts around calls,
as autocast would but visible in the graph:

* matmul-like calls (convolutions, linear, matmul, einsum, attention products) get their
  floating-point arguments cast to the low dtype;
* normalisations and softmax get theirs cast to float32 (their result stays float32);
* everything else (the preconditioner's scalings, noise embeddings, residual sums) runs in the
  dtype type promotion gives, so float32 I/O and float32 sinusoids stay float32.

Weights stay float32 in the model; their casts to the low dtype are constant-folded later by
ONNX (:func:`diffexport.export.onnx.export_onnx`); AOTInductor (no freezing, see
``docs/aoti_freezing.md``) casts them at run time.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

_LOW = {
    F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear,
    torch.matmul, torch.mm, torch.bmm, torch.einsum, torch.addmm, torch.baddbmm,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm,
}  # fmt: skip
_FP32 = {
    F.group_norm, F.layer_norm, F.batch_norm, F.instance_norm, F.softmax, F.log_softmax,
    torch.softmax, torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax,
}  # fmt: skip


def dtype_of(precision: str) -> torch.dtype:
    """The torch dtype of ``fp32 | fp16 | bf16``; ``ValueError`` naming the choices."""
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {precision!r}")
    return DTYPES[precision]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class _MixedPrecision(TorchFunctionMode):
    def __init__(self, low: torch.dtype):
        super().__init__()
        self.low = low

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attention(self.low, *args, **kwargs)
        dtype = self.low if func in _LOW else torch.float32 if func in _FP32 else None
        if dtype is not None:
            args, kwargs = _cast(args, dtype), {k: _cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _attention(low, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Eval-mode ``scaled_dot_product_attention`` spelled out: low-precision products, fp32 softmax."""
    if attn_mask is not None or is_causal or dropout_p or enable_gqa:
        raise NotImplementedError("mixed-precision export supports unmasked, non-causal scaled_dot_product_attention only")
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.to(low) * scale) @ k.to(low).transpose(-2, -1)
    return torch.softmax(scores.float(), dim=-1).to(low) @ v.to(low)


@contextmanager
def mixed_precision(precision: str) -> Iterator[None]:
    """Trace with explicit casts for ``fp16``/``bf16`` (see the module docstring); ``fp32``: no-op."""
    low = dtype_of(precision)
    with nullcontext() if low == torch.float32 else _MixedPrecision(low):
        yield
