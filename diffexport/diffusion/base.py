"""Protocols shared by the diffusion framework (mirrors ``physicsnemo.diffusion.base``).

Three callables, from the network outwards:

* :class:`DiffusionModel` -- a trainable network ``model(x, t, condition=None, **kw)``.
* :class:`Predictor` -- ``(x, t) -> prediction`` of x0, the score or epsilon (no condition
  argument: bind it with ``functools.partial``).
* :class:`Denoiser` -- ``(x, t) -> update``: what a solver integrates (ODE right-hand side,
  reverse-SDE drift, or for discrete chains the epsilon prediction). Built from a predictor
  by ``noise_scheduler.get_denoiser``.

A fourth one, :class:`EDMDenoiserFn`, is the contract of exported engines: the preconditioned
EDM denoiser ``D(x; sigma)`` with ``x = x0 + sigma * n`` (unscaled) and ``sigma`` of shape [B].
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeGuard, Union, runtime_checkable

import torch
from torch import Tensor

if TYPE_CHECKING:  # tensordict imports torch._dynamo (seconds): only where a TensorDict is built
    from tensordict import TensorDict

PredictorType = Literal["x0", "score", "epsilon"]
Condition = Union[Tensor, "TensorDict", None]


@runtime_checkable
class DiffusionModel(Protocol):
    """``model(x [B, *], t [B], condition=None, **kw) -> [B, *]``."""

    def __call__(self, x: Tensor, t: Tensor, condition: Condition = None, **kwargs: Any) -> Tensor: ...


@runtime_checkable
class Predictor(Protocol):
    """``predictor(x [B, *], t [B]) -> x0 | score | epsilon [B, *]``."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x [B, *], t [B]) -> update [B, *]`` consumed by a solver."""

    def __call__(self, x: Tensor, t: Tensor) -> Tensor: ...


@runtime_checkable
class EDMDenoiserFn(Protocol):
    """``D(x [B, *], sigma [B], **conditions) -> x0 estimate``, EDM semantics (x = x0 + sigma n)."""

    def __call__(self, x: Tensor, sigma: Tensor, **conditions: Any) -> Tensor: ...


def batch_view(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample tensor ``v`` [B] to ``(B, 1, ..., 1)`` so it broadcasts against x."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def is_tensordict(v: Any) -> TypeGuard[TensorDict]:
    """``isinstance(v, tensordict.TensorDict)`` without importing tensordict (none exists before it is)."""
    module = sys.modules.get("tensordict")
    cls = getattr(module, "TensorDict", None)
    return cls is not None and isinstance(v, cls)


def check_batch(name: str, v: Tensor | TensorDict | None, batch_size: int, *, exact_1d: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` if ``v`` does not carry ``batch_size`` samples.

    Shape checks only: callers skip them while tracing (``torch.compiler.is_compiling()``).
    """
    if v is None:
        return
    if is_tensordict(v):
        got = v.batch_size[0] if len(v.batch_size) else None
        if got is not None and got != batch_size:
            raise ValueError(f"{name} has batch size {got}, expected {batch_size} (the batch of x)")
        return
    if exact_1d and tuple(v.shape) != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},) matching the batch of x, got {tuple(v.shape)}")
    if not exact_1d and (v.ndim == 0 or v.shape[0] != batch_size):
        raise ValueError(f"{name} has batch size {tuple(v.shape)[:1]}, expected {batch_size} (the batch of x)")


class ArgumentError(ValueError):
    """A constructor argument out of its range; ``name`` is the argument (recipes name it as a field)."""

    def __init__(self, name: str, requirement: str, value: Any) -> None:
        super().__init__(f"{name} must be {requirement}, got {value!r}")
        self.name, self.requirement, self.value = name, requirement, value


def require(ok: bool, name: str, requirement: str, value: Any) -> None:
    """Raise :class:`ArgumentError` (``name must be requirement, got value``) unless ``ok``."""
    if not ok:
        raise ArgumentError(name, requirement, value)


GeneratorLike = torch.Generator | int | None


class NoiseSource:
    """Standard normal draws from a ``torch.Generator``, an int seed, or the global RNG (None).

    An int seed becomes a generator on the device of the first tensor drawn for, so the same seed
    gives the same draws, bit for bit, on a given device. A generator is used as is (it must live
    on the device of the tensors drawn for).
    """

    def __init__(self, generator: GeneratorLike = None) -> None:
        if generator is not None and not isinstance(generator, (torch.Generator, int)):
            raise ValueError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")
        self.seed = generator if isinstance(generator, int) else None
        self.generator = generator if isinstance(generator, torch.Generator) else None

    @classmethod
    def of(cls, generator: GeneratorLike | NoiseSource) -> NoiseSource:
        """``generator`` itself if it is already a NoiseSource (to share one stream), else a new one."""
        return generator if isinstance(generator, NoiseSource) else cls(generator)

    def _draw(self, fn, x: Tensor) -> Tensor:
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(device=x.device).manual_seed(self.seed)
        return fn(x.shape, generator=self.generator, device=x.device, dtype=x.dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        """N(0, 1) draws shaped like x."""
        return self._draw(torch.randn, x)

    def rand_like(self, x: Tensor) -> Tensor:
        """U[0, 1) draws shaped like x."""
        return self._draw(torch.rand, x)
