"""Analytic test doubles: exact denoisers for Gaussian data N(mu, s^2) (elementwise).

Useful to check samplers and runtimes without a trained network: the exact EDM denoiser
:class:`GaussianDenoiser` behaves like an exported engine ``D(x, sigma) -> x0``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from diffexport.diffusion.base import batch_view
from diffexport.diffusion.noise_schedulers import GaussianScheduler


class GaussianDenoiser:
    """Exact EDM denoiser for x0 ~ N(mu, s^2): ``D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)``.

    Counts its evaluations in ``nfe``; extra keyword arguments (conditions) are ignored.
    """

    def __init__(self, mu: float, s: float) -> None:
        self.mu, self.s, self.nfe = mu, s, 0

    def __call__(self, x: Tensor, sigma: Tensor, **conditions: Any) -> Tensor:
        self.nfe += 1
        sigma = batch_view(sigma, x).to(x.dtype)
        return (self.s**2 * x + sigma**2 * self.mu) / (self.s**2 + sigma**2)


class GaussianEpsilonPredictor:
    """Exact epsilon-predictor ``eps(x_t, t) = (x_t - alpha E[x0 | x_t]) / sigma`` of any
    :class:`GaussianScheduler` (``x_t = alpha x0 + sigma eps``) for x0 ~ N(mu, s^2)."""

    def __init__(self, scheduler: GaussianScheduler, mu: float, s: float) -> None:
        self.scheduler, self.mu, self.s = scheduler, mu, s

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        a, sg = self.scheduler._coef(t, x)
        x0 = self.mu + a * self.s**2 / (a**2 * self.s**2 + sg**2) * (x - a * self.mu)
        return self.scheduler.x0_to_epsilon(x0, x, t)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one thread (tiny elementwise ops slow down badly on a shared, busy CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
