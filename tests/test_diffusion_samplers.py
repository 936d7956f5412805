"""Solvers and sample(): analytic Gaussian data, EDM reference algorithms, NFE, seeds, hooks.

For x0 ~ N(mu, s^2) the exact EDM denoiser is D(x, sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)
(:class:`GaussianDenoiser`), so a correct sampler must return samples with mean mu and std s, up to
(a) sampling noise: 20000 scalars give std errors 0.0035 (mean) and 0.5 % (std, relative);
(b) the initial latents missing the data mean: bias ~ mu s / sigma_max <= 0.01;
(c) the solver's discretisation error, measured separately with the exact linear ODE map.
Tolerances: |mean - mu| <= 0.03 everywhere; per-configuration relative std tolerance below.
"""

import math

import pytest
import torch
from torch import nn

from diffexport.diffusion import (
    DDPMScheduler,
    EDMNoiseScheduler,
    EDMStochasticHeunSolver,
    EulerSolver,
    HeunSolver,
    IDDPMNoiseScheduler,
    VENoiseScheduler,
    VPNoiseScheduler,
    check_finite,
    edm_x0_predictor,
    sample,
)
from diffexport.diffusion.samplers import check_fit, ddpm_sample, sample_step_table, solvers_for, step_table
from diffexport.diffusion.testing import GaussianDenoiser, GaussianEpsilonPredictor

MU, S, N_SAMPLES, MEAN_TOL = 1.5, 0.5, 20000, 0.03
CHURN = dict(S_churn=40, S_min=0.05, S_max=50)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(sched, steps, solver="heun", options=None, seed=0, on_step=None):
    engine = GaussianDenoiser(MU, S)
    tmax = sched.timesteps(steps)[:1].expand(N_SAMPLES)
    xN = sched.init_latents((1,), tmax, generator=seed)
    denoiser = sched.get_denoiser(x0_predictor=edm_x0_predictor(engine, sched))
    x0 = sample(denoiser, xN, sched, steps, solver=solver, solver_options=options, on_step=on_step)
    return x0, engine.nfe


# (scheduler, solver, steps, options, relative std tolerance); the measured discretisation errors
# of the std are: EDM Heun-18 +5.5 %, EDM Euler-200 -1.4 %, VP Heun-18 +0.8 %, VP Euler-100 -0.4 %,
# VE Heun-256 -0.3 %, iDDPM Heun-18 +1.6 %, stochastic (S_churn=40) EDM Heun-64 +2.4 %,
# VP Heun-64 +1.3 %, EDM Euler-256 -4.6 %.
CASES = [
    (EDMNoiseScheduler(), "heun", 18, None, 0.08),
    (EDMNoiseScheduler(), "euler", 200, None, 0.04),
    (VPNoiseScheduler(), "heun", 18, None, 0.035),
    (VPNoiseScheduler(), "euler", 100, None, 0.035),
    (VENoiseScheduler(), "heun", 256, None, 0.03),
    (IDDPMNoiseScheduler(), "heun", 18, None, 0.045),
    (EDMNoiseScheduler(), "edm_stochastic_heun", 64, dict(CHURN, generator=1), 0.05),
    (VPNoiseScheduler(), "edm_stochastic_heun", 64, dict(CHURN, generator=1), 0.045),
    (EDMNoiseScheduler(), "edm_stochastic_euler", 256, dict(S_churn=40, generator=1), 0.07),
]


@pytest.mark.parametrize("sched,solver,steps,options,std_tol", CASES,
                         ids=[f"{type(c[0]).__name__[:-14]}-{c[1]}-{c[2]}" for c in CASES])
def test_gaussian_moments(sched, solver, steps, options, std_tol):
    x0, _ = _run(sched, steps, solver, options)
    assert x0.shape == (N_SAMPLES, 1) and torch.isfinite(x0).all()
    assert abs(x0.mean().item() - MU) <= MEAN_TOL
    assert abs(x0.std().item() / S - 1) <= std_tol


@pytest.mark.parametrize("sched", [EDMNoiseScheduler(), VPNoiseScheduler(), VENoiseScheduler()], ids=lambda s: type(s).__name__)
def test_heun_converges_to_exact_ode_map(sched):
    """PF-ODE for Gaussian data is linear: x0 - mu = (x_T/alpha_T - mu) s / sqrt(s^2 + sigma_T^2)."""
    steps = 512 if isinstance(sched, VENoiseScheduler) else 128
    ts = sched.timesteps(steps, dtype=torch.float64)
    xT = sched.sigma(ts[:1]) * torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    den = sched.get_denoiser(x0_predictor=edm_x0_predictor(GaussianDenoiser(MU, S), sched))
    a, sig = sched.alpha(ts[:1]), sched.edm_sigma(ts[:1])
    exact = MU + (xT / a - MU) * S / (S**2 + sig**2).sqrt()
    torch.testing.assert_close(sample(den, xT, sched, steps), exact, rtol=0, atol=2e-3)


def test_heun_matches_edm_algorithm_1():
    sched, D = EDMNoiseScheduler(), GaussianDenoiser(MU, S)
    ts = sched.timesteps(18)
    xN = sched.init_latents((3, 4), ts[:1].expand(5), generator=0)
    x = xN
    for t_cur, t_next in zip(ts[:-1], ts[1:]):  # Karras et al. 2022, Algorithm 1
        d = (x - D(x, t_cur.expand(5))) / t_cur
        x_next = x + (t_next - t_cur) * d
        if t_next != 0:
            d2 = (x_next - D(x_next, t_next.expand(5))) / t_next
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d2)
        x = x_next
    out = sample(sched.get_denoiser(x0_predictor=edm_x0_predictor(D, sched)), xN, sched, 18)
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-5)


def test_stochastic_heun_matches_edm_algorithm_2():
    sched, D, N, B = EDMNoiseScheduler(), GaussianDenoiser(MU, S), 18, 6
    S_churn, S_min, S_max, S_noise = 40.0, 0.05, 50.0, 1.003
    ts = sched.timesteps(N)
    xN = sched.init_latents((2,), ts[:1].expand(B), generator=0)
    g, x = torch.Generator().manual_seed(11), xN
    for t_cur, t_next in zip(ts[:-1], ts[1:]):  # Karras et al. 2022, Algorithm 2
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * torch.randn(x.shape, generator=g)
        d = (x_hat - D(x_hat, t_hat.expand(B))) / t_hat
        x_next = x_hat + (t_next - t_hat) * d
        if t_next != 0:
            d2 = (x_next - D(x_next, t_next.expand(B))) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    opts = dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, generator=11)
    den = sched.get_denoiser(x0_predictor=edm_x0_predictor(D, sched))
    out = sample(den, xN, sched, N, "edm_stochastic_heun", solver_options=opts)
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver,nfe", [("heun", 35), ("euler", 18), ("edm_stochastic_heun", 35), ("edm_stochastic_euler", 18)])
def test_nfe(solver, nfe):
    sched, D = EDMNoiseScheduler(), GaussianDenoiser(MU, S)
    xN = sched.init_latents((2,), sched.timesteps(18)[:1].expand(3), generator=0)
    sample(sched.get_denoiser(x0_predictor=edm_x0_predictor(D, sched)), xN, sched, 18, solver=solver,
           solver_options={"S_churn": 10} if "stochastic" in solver else None)
    assert D.nfe == nfe  # Heun: 2N - 1, the step to sigma = 0 is an Euler step


@pytest.mark.parametrize("solver", ["edm_stochastic_heun", "edm_stochastic_euler"])
@pytest.mark.parametrize("sched", [EDMNoiseScheduler(), VPNoiseScheduler()], ids=lambda s: type(s).__name__)
def test_stochastic_seeds(sched, solver):
    def run(generator):
        D = GaussianDenoiser(MU, S)
        xN = sched.init_latents((4,), sched.timesteps(8)[:1].expand(16), generator=0)
        den = sched.get_denoiser(x0_predictor=edm_x0_predictor(D, sched))
        return sample(den, xN, sched, 8, solver=solver, solver_options=dict(CHURN, generator=generator))

    a, b = run(123), run(123)
    assert torch.equal(a, b)  # bit for bit
    assert torch.equal(a, run(torch.Generator().manual_seed(123)))
    assert not torch.allclose(a, run(124))


def test_zero_churn_is_deterministic_heun():
    for sched in (EDMNoiseScheduler(), VPNoiseScheduler()):
        D = GaussianDenoiser(MU, S)
        xN = sched.init_latents((4,), sched.timesteps(10)[:1].expand(8), generator=0)
        den = sched.get_denoiser(x0_predictor=edm_x0_predictor(D, sched))
        churn0 = sample(den, xN, sched, 10, "edm_stochastic_heun", solver_options={"S_churn": 0})
        assert torch.equal(churn0, sample(den, xN, sched, 10))


def test_churn_gamma_rule_and_vp_marginal():
    """gamma = min(S_churn/N, sqrt(2)-1) inside [S_min, S_max], else 0; for VP the raised state is
    distributed exactly as the forward process at t_hat (x / alpha = x0 + edm_sigma * n)."""
    vp = VPNoiseScheduler()
    solver = EDMStochasticHeunSolver(lambda x, t: x, S_churn=1000, S_min=0.1, S_max=10, num_steps=10, generator=0,
                                     noise_scheduler=vp)
    assert solver.gamma == pytest.approx(math.sqrt(2) - 1)
    t = vp.edm_sigma_inv(torch.tensor([0.05, 1.0, 20.0]))
    x = torch.randn(3, 4)
    x_hat, t_hat = solver.churn(x, t)
    torch.testing.assert_close(vp.edm_sigma(t_hat), torch.tensor([0.05, math.sqrt(2), 20.0]))
    assert torch.equal(x_hat[[0, 2]], x[[0, 2]]) and torch.equal(t_hat[[0, 2]], t[[0, 2]])
    n = 200000
    t = vp.edm_sigma_inv(torch.full((n,), 1.0, dtype=torch.float64))
    x = vp.alpha(t)[:, None] * (MU + math.sqrt(S**2 + 1.0) * torch.randn(n, 1, dtype=torch.float64))
    x_hat, t_hat = solver.churn(x, t)
    z = x_hat / vp.alpha(t_hat)[:, None]
    assert abs(z.mean().item() - MU) < 0.02 and abs(z.std().item() - math.sqrt(S**2 + 2.0)) < 0.01


@pytest.mark.parametrize("sched", [EDMNoiseScheduler(), VENoiseScheduler(), VPNoiseScheduler()], ids=lambda s: type(s).__name__)
def test_edm_x0_predictor_is_posterior_mean(sched):
    """Engine D(x; sigma) driven through edm_x0_predictor gives E[x0 | x_t] of the scheduler's own
    forward process x_t = alpha x0 + sigma eps (for VP: D(x_t / alpha, sigma / alpha))."""
    t = sched.timesteps(6, dtype=torch.float64)[:-1]
    x_t = torch.randn(6, 3, dtype=torch.float64)
    x0 = edm_x0_predictor(GaussianDenoiser(MU, S), sched)(x_t, t)
    eps = GaussianEpsilonPredictor(sched, MU, S)(x_t, t)
    torch.testing.assert_close(x0, sched.epsilon_to_x0(eps, x_t, t))


def test_on_step_hook_and_check_finite():
    sched, D = EDMNoiseScheduler(), GaussianDenoiser(MU, S)
    den = sched.get_denoiser(x0_predictor=edm_x0_predictor(D, sched))
    xN = sched.init_latents((2,), sched.timesteps(5)[:1].expand(3), generator=0)
    seen = []
    out = sample(den, xN, sched, 5, on_step=lambda i, tc, tn, x: seen.append((i, tc.item(), tn.item(), x.clone())))
    ts = sched.timesteps(5)
    assert [s[0] for s in seen] == list(range(5))
    assert [s[1] for s in seen] == ts[:-1].tolist() and [s[2] for s in seen] == ts[1:].tolist()
    assert torch.equal(seen[-1][3], out)
    sample(den, xN, sched, 5, on_step=check_finite)
    bad = sched.get_denoiser(x0_predictor=lambda x, t: torch.where(t[:, None] < 1, float("nan"), x))
    with pytest.raises(FloatingPointError, match="step 3"):
        sample(bad, xN, sched, 5, solver="euler", on_step=check_finite)


def test_custom_solver_and_time_steps():
    sched = EDMNoiseScheduler()
    den = sched.get_denoiser(x0_predictor=edm_x0_predictor(GaussianDenoiser(MU, S), sched))
    xN = torch.randn(4, 2) * 80
    ts = torch.tensor([80.0, 10.0, 1.0, 0.1, 0.0])
    a = sample(den, xN, sched, 0, solver=EulerSolver(den), time_steps=ts)
    b = sample(den, xN, sched, 99, solver="euler", time_steps=ts)
    assert torch.equal(a, b)


def test_bad_inputs():
    sched = EDMNoiseScheduler()
    den = sched.get_denoiser(x0_predictor=lambda x, t: x)
    xN = torch.randn(4, 2)
    with pytest.raises(ValueError, match="num_steps"):
        sample(den, xN, sched, 0)
    with pytest.raises(ValueError, match="unknown solver"):
        sample(den, xN, sched, 4, solver="rk4")
    with pytest.raises(ValueError, match="solver_options"):
        sample(den, xN, sched, 4, solver=HeunSolver(den), solver_options={"alpha": 0.5})
    with pytest.raises(ValueError, match="time_steps"):
        sample(den, xN, sched, 4, time_steps=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="alpha"):
        HeunSolver(den, alpha=0.0)
    with pytest.raises(ValueError, match="t_cur"):
        HeunSolver(den).step(xN, torch.ones(3), torch.zeros(4))
    with pytest.raises(ValueError, match="S_churn"):
        EDMStochasticHeunSolver(den, S_churn=-1)
    with pytest.raises(ValueError, match="generator"):
        EDMStochasticHeunSolver(den, S_churn=1, generator="seed")


def test_ddpm_ancestral_and_ddim_gaussian():
    """DDPM (eta=1, all 1000 steps; measured std error -0.8 %) and DDIM (eta=0, 200 steps; -1.3 %)
    with the exact epsilon-predictor of N(mu, s^2) data."""
    dd = DDPMScheduler()
    eps = GaussianEpsilonPredictor(dd, MU, S)
    for steps, eta, std_tol in ((None, 1.0, 0.03), (200, 0.0, 0.035)):
        x0 = ddpm_sample(dd, eps, (N_SAMPLES, 1), steps, eta=eta, generator=0)
        assert abs(x0.mean().item() - MU) <= MEAN_TOL and abs(x0.std().item() / S - 1) <= std_tol
    a = ddpm_sample(dd, eps, (8, 1), 20, eta=1.0, generator=5)
    assert torch.equal(a, ddpm_sample(dd, eps, (8, 1), 20, eta=1.0, generator=5))
    # a plain epsilon U-Net model(x, t_int) (stand-in) is called with int64 timesteps, T-1 first
    net = nn.Conv2d(1, 1, 1)
    seen = []

    def unet(x, t):
        seen.append(t)
        return net(x)

    with torch.no_grad():
        assert ddpm_sample(dd, unet, (2, 1, 4, 4), 10, eta=0.0, generator=0).shape == (2, 1, 4, 4)
    assert len(seen) == 10 and seen[0].dtype == torch.int64 and seen[0].tolist() == [999, 999]
    # the same chain through the generic sample() with the "ddim" key
    xT = dd.init_latents((1,), torch.full((8,), 999), generator=0)
    b = sample(dd.get_denoiser(epsilon_predictor=eps), xT, dd, 20, solver="ddim", solver_options={"eta": 0.0})
    x0_ref = ddpm_sample(dd, eps, (8, 1), 20, eta=0.0, generator=0)
    torch.testing.assert_close(b, x0_ref)


STEP_TABLE_CASES = [
    (EDMNoiseScheduler(), "euler", {}),
    (EDMNoiseScheduler(), "heun", {}),
    (EDMNoiseScheduler(), "heun", {"alpha": 0.5}),
    (EDMNoiseScheduler(), "edm_stochastic_heun", {"S_churn": 40, "S_min": 0.05, "S_max": 50}),
    (EDMNoiseScheduler(), "edm_stochastic_euler", {"S_churn": 10, "S_noise": 1.003}),
    (VENoiseScheduler(), "heun", {}),
    (VPNoiseScheduler(), "heun", {}),
    (VPNoiseScheduler(), "edm_stochastic_heun", {"S_churn": 20}),
    (IDDPMNoiseScheduler(), "euler", {}),
    (DDPMScheduler(), "ddim", {"eta": 0.0}),
    (DDPMScheduler(), "ddim", {"eta": 1.0}),
]


@pytest.mark.parametrize("case", range(len(STEP_TABLE_CASES)), ids=lambda i: f"{type(STEP_TABLE_CASES[i][0]).__name__}-{STEP_TABLE_CASES[i][1]}")
def test_step_table_reproduces_sample(case):
    """The manifest's per-step coefficients (what the C++ runner reads) give sample()'s trajectory."""
    scheduler, solver, options = STEP_TABLE_CASES[case]
    D = GaussianDenoiser(MU, S)
    n = 12
    ts = scheduler.timesteps(n)
    xN = scheduler.init_latents((3,), ts[:1].expand(4), generator=1, dtype=torch.float64)
    predictor = edm_x0_predictor(D, scheduler)
    draws = {"generator": torch.Generator().manual_seed(7)} if solver not in ("euler", "heun") else {}
    want = sample(scheduler.get_denoiser(x0_predictor=predictor), xN, scheduler, n, solver=solver, time_steps=ts,
                  solver_options={**options, **draws})
    table = step_table(scheduler, solver, ts, options)
    assert len(table) == n
    got = sample_step_table(D, xN, table, torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.isfinite(got).all() and not torch.equal(got, xN)


@pytest.mark.parametrize("solver", ["euler", "heun", "edm_stochastic_heun"])
def test_ode_solvers_refuse_ddpm_and_ddim_refuses_continuous(solver):
    with pytest.raises(ValueError, match="for DDPMScheduler use one of: ddim"):
        check_fit(solver, DDPMScheduler())
    with pytest.raises(ValueError, match="needs a DDPMScheduler"):
        check_fit("ddim", EDMNoiseScheduler)
    assert solvers_for(DDPMScheduler) == ["ddim"] and "ddim" not in solvers_for(VPNoiseScheduler)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class _TimeRecorder(GaussianDenoiser):
    def __init__(self) -> None:
        super().__init__(MU, S)
        self.sigmas: list[float] = []

    def __call__(self, x, sigma, **conditions):
        self.sigmas.append(float(sigma[0]))
        return super().__call__(x, sigma, **conditions)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sigma_min=st.floats(1e-4, 1.0), ratio=st.floats(2.0, 1e6), steps=st.integers(1, 6),
       solver=st.sampled_from(["heun", "edm_stochastic_heun"]))
def test_float32_heun_evaluates_at_the_schedule_times(sigma_min, ratio, steps, solver):
    """Heun (alpha = 1) takes its second slope at t_next itself: in float32 t_cur + (t_next - t_cur)
    cancelled to 0 for VE's default range (t from 1e4 to 4e-4), and the step returned NaN."""
    sched, D = VENoiseScheduler(sigma_min, sigma_min * ratio), _TimeRecorder()
    ts = sched.timesteps(steps)
    xN = sched.init_latents((3,), ts[:1].expand(2), generator=0)
    den = sched.get_denoiser(x0_predictor=edm_x0_predictor(D, sched))
    out = sample(den, xN, sched, steps, solver, solver_options={"S_churn": 0.0} if solver != "heun" else None)
    assert torch.isfinite(out).all()
    allowed = set(sched.edm_sigma(ts[:-1]).tolist())
    assert set(D.sigmas) <= allowed, sorted(set(D.sigmas) - allowed)


def test_ve_default_two_heun_steps_are_finite_in_float32():
    sched = VENoiseScheduler()  # PhysicsNeMo's defaults: sigma 100 -> 0.02, t = sigma^2
    xN = sched.init_latents((8,), sched.timesteps(2)[:1].expand(4), generator=0)
    den = sched.get_denoiser(x0_predictor=edm_x0_predictor(GaussianDenoiser(MU, S), sched))
    out32 = sample(den, xN, sched, 2, "heun")
    out64 = sample(den, xN.double(), sched, 2, "heun", time_steps=sched.timesteps(2, dtype=torch.float64))
    assert torch.isfinite(out32).all()
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-4)


def test_round_time_steps_is_edms_sigma_inv_of_round_sigma():
    """``round_time_steps``: EDM's ``t_steps = sigma_inv(net.round_sigma(sigma(t)))`` with the final 0 kept; the
    iDDPM table's own u_j steps, a continuous preconditioner (no rounding) and DDPM's integer steps are unchanged."""
    from diffexport.diffusion import DDPMScheduler, EDMNoiseScheduler, IDDPMNoiseScheduler, VPNoiseScheduler, round_time_steps
    from diffexport.diffusion.preconditioners import IDDPMPreconditioner, sigma_rounding

    round_sigma, pre = sigma_rounding("IDDPMPreconditioner", {}), IDDPMPreconditioner(torch.nn.Identity())
    for scheduler in (EDMNoiseScheduler(sigma_min=0.0065), VPNoiseScheduler()):  # within the table (EDM clamps sigma_min to it)
        t = scheduler.timesteps(12, dtype=torch.float64)
        got = round_time_steps(scheduler, t, round_sigma)
        assert got[-1] == 0 and got.dtype == torch.float64 and bool((got[1:] < got[:-1]).all())
        index = pre.round_sigma(scheduler.edm_sigma(t[:-1]).float(), return_index=True)  # the level EDM's net.round_sigma picks
        torch.testing.assert_close(scheduler.edm_sigma(got[:-1]), IDDPMPreconditioner.sigma_levels()[index], rtol=1e-12, atol=0)
    iddpm = IDDPMNoiseScheduler()
    for scheduler, t, rounding in ((iddpm, iddpm.timesteps(18, dtype=torch.float64), round_sigma),
                                   (EDMNoiseScheduler(), EDMNoiseScheduler().timesteps(18, dtype=torch.float64), None),
                                   (DDPMScheduler(), DDPMScheduler().timesteps(10), round_sigma)):
        assert torch.equal(round_time_steps(scheduler, t, rounding), t)
