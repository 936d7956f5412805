"""Noise schedulers: time-step formulas (EDM paper Table 1), conversions, reverse ODE/SDE."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffexport.diffusion import (
    DDPMScheduler,
    EDMNoiseScheduler,
    IDDPMNoiseScheduler,
    NoiseScheduler,
    VENoiseScheduler,
    VPNoiseScheduler,
)
from diffexport.diffusion.noise_schedulers import iddpm_sigma_table

CONTINUOUS = [EDMNoiseScheduler(), VENoiseScheduler(), VPNoiseScheduler(), IDDPMNoiseScheduler()]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_edm_timesteps_formula():
    N, smin, smax, rho = 18, 0.002, 80.0, 7.0
    t = EDMNoiseScheduler().timesteps(N, dtype=torch.float64)
    i = torch.arange(N, dtype=torch.float64)
    ref = (smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    assert t.shape == (N + 1,) and t[-1] == 0
    torch.testing.assert_close(t[:-1], ref)
    assert t[0].item() == pytest.approx(smax) and t[N - 1].item() == pytest.approx(smin)


def test_ve_vp_iddpm_timesteps():
    N = 10
    ve = VENoiseScheduler(sigma_min=0.02, sigma_max=100.0).timesteps(N, dtype=torch.float64)
    i = torch.arange(N, dtype=torch.float64)
    torch.testing.assert_close(ve[:-1], 100.0**2 * (0.02**2 / 100.0**2) ** (i / (N - 1)))
    assert VENoiseScheduler().sigma(ve[:1]).item() == pytest.approx(100.0)  # t = sigma^2
    vp = VPNoiseScheduler().timesteps(N, dtype=torch.float64)
    torch.testing.assert_close(vp[:-1], 1 + i / (N - 1) * (1e-3 - 1))
    idd = IDDPMNoiseScheduler().timesteps(N, dtype=torch.float64)
    u = iddpm_sigma_table()
    assert torch.isin(idd[:-1], u).all() and (idd[:-1] <= 81).all() and (idd[:-1] >= 0.002).all()
    assert (idd[:-2] > idd[1:-1]).all()
    for t in (ve, vp, idd):
        assert t.shape == (N + 1,) and t[-1] == 0


@settings(max_examples=40, deadline=None)
@given(sigma_min=st.floats(1e-3, 10.0), ratio=st.floats(1.01, 1e4), M=st.sampled_from([10, 100, 1000]))
def test_iddpm_timesteps_decrease_for_every_step_count_the_table_allows(sigma_min, ratio, M):
    """Up to the number L of levels in [sigma_min, sigma_max] the steps are distinct table levels; L + 1 is
    refused naming the table (it used to repeat levels, refused later as 'not decreasing; check its range')."""
    try:
        sched = IDDPMNoiseScheduler(sigma_min=sigma_min, sigma_max=sigma_min * ratio, M=M)
    except ValueError:
        return  # no level in range: refused by the constructor
    L = len(sched.u)
    for n in sorted({n for n in (1, 2, L // 2, L) if 1 <= n <= L}):
        t = sched.timesteps(n, dtype=torch.float64)[:-1]
        assert len(t) == n and bool((t[:-1] > t[1:]).all()) and bool(torch.isin(t, sched.u).all())
    with pytest.raises(ValueError, match=rf"num_steps must be <= {L}: the iDDPM table of M = {M} has {L} levels between sigma_min"):
        sched.timesteps(L + 1)


def test_iddpm_table():
    u = iddpm_sigma_table(0.001, 0.008, 1000)
    assert u.shape == (1001,) and u[-1] == 0 and (u[:-1] > u[1:]).all()
    abar = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2  # noqa: E731
    assert u[998].item() == pytest.approx(math.sqrt((u[999].item() ** 2 + 1) / max(abar(998) / abar(999), 0.001) - 1))


@pytest.mark.parametrize("sched", [*CONTINUOUS, DDPMScheduler()], ids=lambda s: type(s).__name__)
def test_num_steps_validation_and_protocol(sched):
    assert isinstance(sched, NoiseScheduler)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="num_steps"):
            sched.timesteps(bad)
    assert len(sched.timesteps(1)) == 2


@pytest.mark.parametrize("sched", CONTINUOUS, ids=lambda s: type(s).__name__)
def test_conversions_round_trip(sched):
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    t = sched.timesteps(6, dtype=torch.float64)[1:5].float()
    score = sched.x0_to_score(x0, x_t, t)
    torch.testing.assert_close(sched.score_to_x0(score, x_t, t), x0, rtol=1e-4, atol=1e-4)
    eps = sched.x0_to_epsilon(x0, x_t, t)
    torch.testing.assert_close(sched.epsilon_to_x0(eps, x_t, t), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sched.epsilon_to_score(eps, t), score, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sched.score_to_epsilon(score, t), eps, rtol=1e-4, atol=1e-4)
    # get_denoiser gives the same ODE right-hand side from all three predictor types
    preds = {"x0": x0, "score": score, "epsilon": eps}
    f = {k: sched.get_denoiser(**{f"{k}_predictor": (lambda x, t, v=v: v)}) for k, v in preds.items()}
    ref = f["x0"](x_t, t)
    for k in ("score", "epsilon"):
        torch.testing.assert_close(f[k](x_t, t), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sched", CONTINUOUS, ids=lambda s: type(s).__name__)
def test_ode_sde_and_edm_sigma(sched):
    t = sched.timesteps(4, dtype=torch.float64)[:-1]
    x, x0 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    pred = lambda x, t: x0  # noqa: E731
    ode = sched.get_denoiser(x0_predictor=pred)(x, t)
    sde = sched.get_denoiser(x0_predictor=pred, denoising_type="sde")(x, t)
    score = sched.x0_to_score(x0, x, t)
    g2 = sched.diffusion(x, t)
    torch.testing.assert_close(sde - ode, -0.5 * g2 * score)
    torch.testing.assert_close(ode, sched.drift(x, t) - 0.5 * g2 * score)
    # edm_sigma = sigma / alpha, inverted by edm_sigma_inv; sigma_inv inverts sigma
    torch.testing.assert_close(sched.edm_sigma(t), sched.sigma(t) / sched.alpha(t))
    torch.testing.assert_close(sched.edm_sigma_inv(sched.edm_sigma(t)), t)
    torch.testing.assert_close(sched.sigma_inv(sched.sigma(t)), t, rtol=1e-6, atol=1e-6)
    # sigma_dot / alpha_dot against central differences
    h = 1e-6
    torch.testing.assert_close(sched.sigma_dot(t), (sched.sigma(t + h) - sched.sigma(t - h)) / (2 * h), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sched.alpha_dot(t), (sched.alpha(t + h) - sched.alpha(t - h)) / (2 * h), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="exactly one"):
        sched.get_denoiser(x0_predictor=pred, score_predictor=pred)
    with pytest.raises(ValueError, match="denoising_type"):
        sched.get_denoiser(x0_predictor=pred, denoising_type="ddim")


def test_edm_ode_is_karras_form():
    """EDM: dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. eq. 3 with sigma(t) = t)."""
    sched = EDMNoiseScheduler()
    x, x0, t = torch.randn(3, 5), torch.randn(3, 5), torch.tensor([80.0, 1.0, 0.01])
    d = sched.get_denoiser(x0_predictor=lambda x, t: x0)(x, t)
    torch.testing.assert_close(d, (x - x0) / t[:, None])


def test_vp_matches_edm_paper_sigma():
    vp = VPNoiseScheduler(beta_min=0.1, beta_d=19.9)
    t = torch.linspace(1e-3, 1, 7, dtype=torch.float64)
    torch.testing.assert_close(vp.edm_sigma(t), (torch.exp(0.5 * 19.9 * t**2 + 0.1 * t) - 1).sqrt())
    torch.testing.assert_close(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t))
    assert vp.beta_d == 19.9 and VPNoiseScheduler().beta_d == 19.1  # PhysicsNeMo 2.2 default


@pytest.mark.parametrize("sched", CONTINUOUS, ids=lambda s: type(s).__name__)
def test_add_noise_sample_time_init_latents(sched):
    g = torch.Generator().manual_seed(1)
    t = sched.sample_time(4000, generator=g)
    assert t.shape == (4000,) and (t > 0).all()
    w = sched.loss_weight(t)
    assert w.shape == (4000,) and torch.isfinite(w).all() and (w > 0).all()
    x0 = torch.full((4000, 1), 2.0)
    noise = torch.randn(4000, 1, generator=g)
    x_t = sched.add_noise(x0, t, noise)
    torch.testing.assert_close(x_t, sched.alpha(t)[:, None] * 2.0 + sched.sigma(t)[:, None] * noise)
    tmax = sched.timesteps(4)[:1].expand(3)
    a = sched.init_latents((2, 5), tmax, generator=7)
    b = sched.init_latents((2, 5), tmax, generator=torch.Generator().manual_seed(7))
    assert a.shape == (3, 2, 5) and torch.equal(a, b)
    assert torch.allclose(a / sched.sigma(tmax)[:, None, None], torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(7)))


def test_edm_sample_time_is_lognormal():
    sched = EDMNoiseScheduler(P_mean=-1.2, P_std=1.2)
    log_s = sched.sample_time(20000, generator=0).log()
    assert abs(log_s.mean().item() + 1.2) < 0.05 and abs(log_s.std().item() - 1.2) < 0.05
    t = torch.tensor([0.1, 1.0])
    torch.testing.assert_close(sched.loss_weight(t), (t**2 + 0.25) / (0.5 * t) ** 2)


def test_ddpm_scheduler_tables_and_steps():
    dd = DDPMScheduler()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(dd.alphas_cumprod, torch.cumprod(1 - betas, 0))
    ts = dd.timesteps()
    assert ts.dtype == torch.int64 and ts[0] == 999 and ts[-2] == 0 and ts[-1] == -1 and len(ts) == 1001
    assert torch.equal(dd.timesteps(4), torch.tensor([999, 666, 333, 0, -1]))
    with pytest.raises(ValueError, match="num_steps"):
        dd.timesteps(1001)
    t = dd.sample_time(64, generator=0)
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    x0, eps = torch.randn(64, 3), torch.randn(64, 3)
    x_t = dd.add_noise(x0, t, eps)
    ab = dd.alphas_cumprod[t].float()[:, None]
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    torch.testing.assert_close(dd.epsilon_to_x0(eps, x_t, t), x0, rtol=1e-3, atol=1e-3)
    # eta = 0 step with the true epsilon maps x_t exactly onto the x_{t-1} of the same x0 and eps
    t = torch.full((64,), 500)
    x_prev = dd.step(eps, t, dd.add_noise(x0, t, eps), t - 1, eta=0.0)
    torch.testing.assert_close(x_prev, dd.add_noise(x0, t - 1, eps), rtol=1e-4, atol=1e-4)
    # the last step (to t = -1) returns the x0 estimate, with no noise even for eta = 1
    t0 = torch.zeros(64, dtype=torch.long)
    torch.testing.assert_close(dd.step(eps, t0, dd.add_noise(x0, t0, eps), eta=1.0, generator=0), x0, rtol=1e-4, atol=1e-4)


from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(sigma_min=st.floats(1e-5, 10.0), log_ratio=st.floats(0.01, 12.0), rho=st.one_of(st.floats(0.05, 1.0), st.floats(1.0, 20.0)),
       steps=st.integers(2, 40))
@example(sigma_min=0.002, log_ratio=math.log(80 / 0.002), rho=0.25, steps=4)
def test_edm_timesteps_end_at_sigma_min_for_any_rho(sigma_min, log_ratio, rho, steps):
    """The last time step is sigma_min itself: a + 1 * (b - a) cancelled to 0 when sigma_max^(1/rho)
    dwarfs sigma_min^(1/rho) (rho = 0.25 with the default 80 / 0.002 range), a valid recipe then refused."""
    sigma_max = sigma_min * math.exp(log_ratio)
    t = EDMNoiseScheduler(sigma_min, sigma_max, rho).timesteps(steps, dtype=torch.float64)
    assert t[0].item() == pytest.approx(sigma_max, rel=1e-9) and t[-2].item() == pytest.approx(sigma_min, rel=1e-9)
    assert bool((t[1:] < t[:-1]).all())


@settings(max_examples=40, deadline=None)
@given(t_max=st.floats(1e-2, 10.0), log_ratio=st.floats(0.01, 60.0), steps=st.integers(2, 40))
@example(t_max=1.0, log_ratio=40.0, steps=3)
def test_vp_timesteps_end_at_epsilon_s(t_max, log_ratio, steps):
    eps = t_max * math.exp(-log_ratio)
    t = VPNoiseScheduler(epsilon_s=eps, t_max=t_max).timesteps(steps, dtype=torch.float64)
    assert t[0].item() == t_max and t[-2].item() == pytest.approx(eps, rel=1e-9)
    assert bool((t[1:] < t[:-1]).all())
