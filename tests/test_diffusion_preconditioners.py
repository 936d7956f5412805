"""Preconditioners against the EDM paper's closed forms, input checks, adapters, torch.export."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tensordict import TensorDict
from torch import nn

from diffexport.diffusion import (
    ConcatConditionWrapper,
    DiffusionModel,
    EDMPreconditioner,
    IDDPMPreconditioner,
    VEPreconditioner,
    VPNoiseScheduler,
    VPPreconditioner,
)
from diffexport.diffusion.noise_schedulers import iddpm_sigma_table


pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """F(x, c_noise) = 1, remembering its inputs."""

    def forward(self, x, c_noise, **kw):
        self.x_in, self.c_noise, self.kw = x, c_noise, kw
        return torch.ones_like(x)


class TinyUNet(nn.Module):
    """Stand-in with the diffexport UNet signature."""

    def __init__(self, in_ch=1, out_ch=1, label_dim=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(1, out_ch)
        self.label = nn.Linear(label_dim, out_ch) if label_dim else None

    def forward(self, x, noise_labels, class_labels, augment_labels=None, lead_time_label=None, global_index=None,
                embedding_selector=None):
        h = self.conv(x) + self.emb(noise_labels[:, None])[:, :, None, None]
        if class_labels is not None:
            h = h + self.label(class_labels)[:, :, None, None]
        if lead_time_label is not None:
            h = h + lead_time_label.reshape(-1, 1, 1, 1)
        return h


class PlainEps(nn.Module):
    """Stand-in for the plain DDPM U-Net ``model(x, t)``."""

    def forward(self, x, t):
        return x * t.reshape(-1, 1, 1, 1)


SIGMA = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64)
X = torch.randn(4, 1, 2, 2, dtype=torch.float64)


def _run(precond):
    D = precond(X, SIGMA)
    return D, precond.model.x_in, precond.model.c_noise


def _bc(v):
    return v.reshape(-1, 1, 1, 1)


def test_edm_coefficients():
    sd = 0.5
    D, x_in, c_noise = _run(EDMPreconditioner(Recorder(), sigma_data=sd))
    s = _bc(SIGMA)
    torch.testing.assert_close(x_in, X / (s**2 + sd**2).sqrt())
    torch.testing.assert_close(c_noise, SIGMA.log() / 4)
    torch.testing.assert_close(D, sd**2 / (s**2 + sd**2) * X + s * sd / (s**2 + sd**2).sqrt())
    assert c_noise.shape == (4,)


def test_ve_coefficients():
    D, x_in, c_noise = _run(VEPreconditioner(Recorder()))
    torch.testing.assert_close(x_in, X)
    torch.testing.assert_close(c_noise, (0.5 * SIGMA).log())
    torch.testing.assert_close(D, X + _bc(SIGMA))


def test_vp_takes_diffusion_time_like_physicsnemo():
    """forward(x, t): sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1), c_noise = (M - 1) t."""
    beta_d, beta_min, M = 19.9, 0.1, 1000
    pre = VPPreconditioner(Recorder(), beta_d=beta_d, beta_min=beta_min, M=M)
    T = torch.tensor([1e-3, 0.05, 0.5, 1.0], dtype=torch.float64)
    D = pre(X, T)
    s = _bc(((0.5 * beta_d * T**2 + beta_min * T).exp() - 1).sqrt())
    torch.testing.assert_close(pre.model.x_in, X / (s**2 + 1).sqrt())
    torch.testing.assert_close(D, X - s)
    torch.testing.assert_close(pre.model.c_noise, (M - 1) * T)
    torch.testing.assert_close(pre.sigma_inv(pre.sigma(T)), T)
    torch.testing.assert_close(pre.sigma(T), VPNoiseScheduler(beta_min, beta_d).edm_sigma(T))
    t32 = torch.tensor([1e-4, 1e-3], dtype=torch.float32)  # expm1 / log1p: small t keeps float32 precision
    torch.testing.assert_close(pre.sigma_inv(pre.sigma(t32)).double(), t32.double(), rtol=1e-5, atol=0)


def test_exported_contract_stays_sigma_for_vp():
    """The engine's D(x, sigma) maps sigma to t inside: equal to the preconditioner at t = sigma_inv(sigma)."""
    from diffexport.export.denoiser import Denoiser

    pre = VPPreconditioner(Recorder())
    D = Denoiser(pre)(X.float(), SIGMA.float())
    s = _bc(SIGMA.float())
    torch.testing.assert_close(D, X.float() - s)
    torch.testing.assert_close(pre.model.x_in, X.float() / (s**2 + 1).sqrt())
    torch.testing.assert_close(D, pre(X.float(), pre.sigma_inv(SIGMA.float())), rtol=1e-5, atol=1e-5)  # = forward at t(sigma)


def test_iddpm_keeps_the_first_half_of_learned_variance_outputs():
    class TwoC(nn.Module):
        def forward(self, x, c_noise, **kw):
            return torch.cat([torch.ones_like(x), torch.full_like(x, 7.0)], dim=1)

    D = IDDPMPreconditioner(TwoC())(X, SIGMA)
    torch.testing.assert_close(D, X - _bc(SIGMA))  # the variance half (7) is dropped
    assert D.shape == X.shape


def test_iddpm_coefficients_and_round_sigma():
    M = 1000
    pre = IDDPMPreconditioner(Recorder(), C_1=0.001, C_2=0.008, M=M)
    D, x_in, c_noise = _run(pre)
    s = _bc(SIGMA)
    u = iddpm_sigma_table(0.001, 0.008, M).float()
    torch.testing.assert_close(pre.u, u)
    j = (SIGMA.float()[:, None] - u[None]).abs().argmin(1)
    torch.testing.assert_close(c_noise, (M - 1 - j).double())
    torch.testing.assert_close(x_in, X / (s**2 + 1).sqrt())
    torch.testing.assert_close(D, X - s)
    assert torch.equal(pre.round_sigma(u[[10, 500]]), u[[10, 500]])
    assert pre.round_sigma(u[[10, 500]], return_index=True).tolist() == [10, 500]
    assert "u" in pre.state_dict()


def test_bad_inputs():
    pre = EDMPreconditioner(Recorder())
    x = torch.randn(2, 1, 2, 2)
    with pytest.raises(ValueError, match="t .*must be > 0"):
        pre(x, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="t .*must be > 0"):
        VEPreconditioner(Recorder())(x, torch.tensor([-1.0, 1.0]))
    with pytest.raises(ValueError, match="t must have shape"):
        pre(x, torch.ones(3))
    with pytest.raises(ValueError, match="condition"):
        pre(x, torch.ones(2), torch.randn(3, 1, 2, 2))
    with pytest.raises(ValueError, match="condition"):
        pre(x, torch.ones(2), TensorDict({"a": torch.randn(3, 2)}, batch_size=[3]))
    VPPreconditioner(Recorder())(x, torch.zeros(2))  # no log of sigma: 0 is allowed


def test_concat_condition_wrapper():
    net = TinyUNet(in_ch=3, out_ch=2, label_dim=4)
    wrapped = ConcatConditionWrapper(net)
    x, t = torch.randn(2, 2, 4, 4), torch.rand(2)
    img, vec, lead = torch.randn(2, 1, 4, 4), torch.randn(2, 4), torch.randn(2)
    cond = TensorDict({"cond_concat": img, "cond_vec": vec, "lead_time_label": lead}, batch_size=[2])
    torch.testing.assert_close(wrapped(x, t, cond), net(torch.cat([x, img], 1), t, vec, lead_time_label=lead))
    plain = ConcatConditionWrapper(TinyUNet(in_ch=3, out_ch=2))
    torch.testing.assert_close(plain(x, t, img), plain.model(torch.cat([x, img], 1), t, None))
    assert isinstance(wrapped, DiffusionModel)
    eps = ConcatConditionWrapper(PlainEps())  # no class_labels parameter: called as model(x, t)
    torch.testing.assert_close(eps(x, t), x * t.reshape(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="class_labels"):
        eps(x, t, TensorDict({"cond_vec": vec}, batch_size=[2]))
    with pytest.raises(ValueError, match="spatial shape"):
        wrapped(x, t, TensorDict({"cond_concat": torch.randn(2, 1, 3, 3), "cond_vec": vec}, batch_size=[2]))
    with pytest.raises(ValueError, match="cond_vec"):
        wrapped(x, t, TensorDict({"cond_concat": img, "cond_vec": torch.randn(3, 4)}, batch_size=[]))
    with pytest.raises(TypeError):
        wrapped(x, t, [img])


def test_preconditioner_forwards_kwargs():
    rec = Recorder()
    gi = torch.zeros(4, 2, 2, 2, dtype=torch.long)
    EDMPreconditioner(rec)(X, SIGMA, global_index=gi, augment_labels=None)
    assert rec.kw["global_index"] is gi and "condition" not in rec.kw


def test_torch_export_dynamic_batch():
    torch.manual_seed(0)
    net = ConcatConditionWrapper(TinyUNet(in_ch=2, out_ch=1, label_dim=3))
    pre = EDMPreconditioner(net, sigma_data=0.5).eval()
    B = torch.export.Dim("batch", min=1, max=64)

    def inputs(b):
        cond = TensorDict({"cond_concat": torch.randn(b, 1, 8, 8), "cond_vec": torch.randn(b, 3)}, batch_size=[b])
        return torch.randn(b, 1, 8, 8), torch.rand(b) + 0.1, cond

    x, sigma, cond = inputs(2)
    dyn = {"x": {0: B}, "t": {0: B}, "condition": [{0: B}, {0: B}]}  # TensorDict leaves in key order
    ep = torch.export.export(pre, (x, sigma, cond), dynamic_shapes=dyn, strict=False)
    for b in (1, 5):
        x, sigma, cond = inputs(b)
        torch.testing.assert_close(ep.module()(x, sigma, cond), pre(x, sigma, cond))


@pytest.mark.parametrize("cls", [IDDPMPreconditioner, VPPreconditioner])
def test_torch_export_table_preconditioners(cls):
    pre = cls(ConcatConditionWrapper(TinyUNet())).eval()
    B = torch.export.Dim("batch", min=1, max=64)
    x, sigma = torch.randn(2, 1, 4, 4), torch.tensor([0.1, 3.0])
    ep = torch.export.export(pre, (x, sigma), dynamic_shapes={"x": {0: B}, "t": {0: B}}, strict=False)
    x, sigma = torch.randn(3, 1, 4, 4), torch.tensor([0.01, 0.5, 1.0])  # diffusion times (VP: t <= 1)
    torch.testing.assert_close(ep.module()(x, sigma), pre(x, sigma))
    assert math.isfinite(ep.module()(x, sigma).abs().max().item())


def test_ddpm_preconditioner_is_the_epsilon_model_in_edm_form():
    """D(x, s_t) = x - s_t * eps(sqrt(abar_t) x, t) at the table's own noise levels."""
    from diffexport.diffusion import DDPMPreconditioner, DDPMScheduler

    class Eps(nn.Module):
        def forward(self, x, t):
            return torch.sin(x + t.view(-1, 1, 1, 1) / 100)  # depends on both, non-zero

    t = torch.tensor([0, 10, 500, 999])
    abar = DDPMScheduler().alpha_bar(t)
    s = ((1 - abar) / abar).sqrt().float()
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = x - s.view(-1, 1, 1, 1) * Eps()(x * abar.sqrt().float().view(-1, 1, 1, 1), t.float())
    torch.testing.assert_close(DDPMPreconditioner(Eps())(x, s), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=200, deadline=None)
@given(sigma=st.floats(0.0065, 2.5e4))
def test_sampler_rounding_is_the_iddpm_preconditioners_round_sigma(sigma):
    """What the stochastic samplers round a churned level to (``rounding_spec`` -> ``sigma_rounding``, no model)
    is the level ``IDDPMPreconditioner.round_sigma`` picks, in float64 (its buffer holds the float32 values);
    continuous preconditioners have no rounding."""
    from diffexport.diffusion.preconditioners import IDDPMPreconditioner, rounding_spec, sigma_rounding

    spec = rounding_spec("IDDPMPreconditioner", {"M": 1000})
    assert spec == {"class": "IDDPMPreconditioner", "args": {"C_1": 0.001, "C_2": 0.008, "M": 1000}}
    assert rounding_spec("EDMPreconditioner", {"sigma_data": 0.5}) is None and rounding_spec("VPPreconditioner", {}) is None
    s = torch.tensor([sigma], dtype=torch.float64)
    got = sigma_rounding(spec["class"], spec["args"])(s)
    levels = IDDPMPreconditioner.sigma_levels()
    assert got.dtype == torch.float64 and got.item() in levels.tolist()
    assert (s - got).abs().item() == (s - levels).abs().min().item()  # the nearest level
    pre = IDDPMPreconditioner(nn.Identity())
    if (levels - s).abs().sort().values[:2].diff().abs().item() > 1e-5 * sigma:  # not at a tie between two levels
        assert got.float().item() == pre.round_sigma(s.float()).item()
