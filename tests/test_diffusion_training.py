"""MSEDSMLoss, guidance (CFG, DPS) and multi-diffusion patching."""

import pytest
import torch
from tensordict import TensorDict
from torch import nn

from diffexport.diffusion import (
    ConcatConditionWrapper,
    DDPMScheduler,
    EDMNoiseScheduler,
    EDMPreconditioner,
    VPNoiseScheduler,
    edm_x0_predictor,
    sample,
)
from diffexport.diffusion.guidance import (
    ClassifierFreeGuidance,
    JointClassifierFreeGuidance,
    DataConsistencyDPSGuidance,
    DPSScorePredictor,
    ModelConsistencyDPSGuidance,
)
from diffexport.diffusion.losses import MSEDSMLoss
from diffexport.diffusion.multi_diffusion import GridPatching2D, PatchBasedPredictor
from diffexport.diffusion.testing import GaussianDenoiser


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.emb = nn.Linear(1, 1)

    def forward(self, x, noise_labels, class_labels=None):
        return self.conv(x) + self.emb(noise_labels[:, None])[:, :, None, None]


@pytest.mark.parametrize("sched", [EDMNoiseScheduler(), VPNoiseScheduler()], ids=lambda s: type(s).__name__)
def test_dsm_loss_decreases(sched):
    torch.manual_seed(0)
    pre = EDMPreconditioner(ConcatConditionWrapper(TinyNet()), sigma_data=0.5)
    model = pre if isinstance(sched, EDMNoiseScheduler) else edm_x0_predictor(pre, sched)  # VP: D(x/alpha, sigma/alpha)
    loss_fn = MSEDSMLoss(model, sched)
    data = 1.5 + 0.5 * torch.randn(64, 1, 6, 6)
    t_eval = sched.sample_time(64, generator=1)

    def eval_loss():
        torch.manual_seed(2)
        with torch.no_grad():
            return loss_fn(data, t=t_eval).item()

    before = eval_loss()
    opt = torch.optim.Adam(pre.parameters(), lr=2e-2)
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(data)
        loss.backward()
        opt.step()
    assert loss.shape == () and eval_loss() < 0.8 * before


def test_dsm_loss_prediction_types():
    dd = DDPMScheduler()
    x0 = torch.randn(4096, 1, 2, 2)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    # epsilon-prediction 0: the weighted x0 error is exactly eps^2 -> E = 1
    loss = MSEDSMLoss(zero, dd, prediction_type="epsilon")(x0)
    assert abs(loss.item() - 1) < 0.05
    per_elem = MSEDSMLoss(zero, dd, prediction_type="score", reduction="none")(x0)
    assert per_elem.shape == x0.shape
    with pytest.raises(ValueError, match="prediction_type"):
        MSEDSMLoss(zero, dd, prediction_type="v")
    seen = {}

    def cond_model(x, t, condition=None, **kw):
        seen.update(condition=condition, **kw)
        return x

    MSEDSMLoss(cond_model, EDMNoiseScheduler())(x0[:4], condition=torch.ones(4, 1), extra=3)
    assert seen["condition"].shape == (4, 1) and seen["extra"] == 3


def test_classifier_free_guidance():
    cfg = ClassifierFreeGuidance(lambda x, t: 2 * x, lambda x, t: x, guidance_scale=3.0)
    x = torch.randn(2, 3)
    torch.testing.assert_close(cfg(x, torch.ones(2)), 4 * x)
    assert torch.equal(ClassifierFreeGuidance(lambda x, t: 2 * x, lambda x, t: x, 1.0)(x, None), 2 * x)


def test_joint_classifier_free_guidance_is_two_calls_in_one():
    """One call on 2B rows (conditional first) gives what the two separate predictors give."""
    w, x, t = 2.5, torch.randn(3, 4), torch.rand(3) + 0.1
    cond, uncond = (lambda x, t: torch.sin(x) * t[:, None]), (lambda x, t: x**2 - t[:, None])
    rows = []

    def joint(x2, t2):
        rows.append(x2.shape[0])
        return torch.cat([cond(x2[:3], t2[:3]), uncond(x2[3:], t2[3:])])

    torch.testing.assert_close(JointClassifierFreeGuidance(joint, w)(x, t), ClassifierFreeGuidance(cond, uncond, w)(x, t), rtol=0, atol=0)
    assert rows == [6]


def test_dps_guidance_analytic():
    """For D(x; sigma) = (s^2 x + sigma^2 mu)/(s^2 + sigma^2): dx0/dx = s^2/(s^2 + sigma^2), so the
    masked L2 guidance is -mask (x0 - y) s^2 / ((s^2 + sigma^2) (std_y^2 + gamma sigma^2))."""
    sched, mu, s, std_y, gamma = EDMNoiseScheduler(), 0.0, 1.0, 0.1, 0.05
    x0_pred = edm_x0_predictor(GaussianDenoiser(mu, s), sched)
    x, t = torch.randn(3, 2, 4), torch.tensor([0.5, 1.0, 4.0])
    mask = torch.zeros(3, 2, 4, dtype=torch.bool)
    mask[:, 0] = True
    y = torch.randn(3, 2, 4)
    tb = t[:, None, None]
    c = s**2 / (s**2 + tb**2)
    x0 = x0_pred(x, t)
    sda = dict(gamma=gamma, sigma_fn=sched.sigma)
    for g, var in ((DataConsistencyDPSGuidance(mask, y, std_y), std_y**2),
                   (DataConsistencyDPSGuidance(mask, y, std_y, alpha_fn=sched.alpha, **sda), std_y**2 + gamma * tb**2),
                   (ModelConsistencyDPSGuidance(lambda z: z[:, :1], y[:, :1], std_y, **sda), std_y**2 + gamma * tb**2)):
        dps = DPSScorePredictor(x0_pred, sched.x0_to_score, g)
        with torch.no_grad():
            out = dps(x, t)
        expected = sched.x0_to_score(x0, x, t) - mask * (x0 - y) * c / var
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sigma_fn"):
        ModelConsistencyDPSGuidance(lambda z: z, y, std_y, gamma=1.0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="autograd"):
        DPSScorePredictor(x0_pred, sched.x0_to_score, DataConsistencyDPSGuidance(mask, y, std_y))(x, t)


def test_dps_sampling_pulls_observed_pixels():
    """Prior N(0, 1), y = 2 observed on channel 0 with std_y = 0.1: the exact posterior there is
    N(1.98, 0.0995^2). DPS is an approximation (with the SDA gamma = 1 it lands at ~1.77, std ~0.16),
    so check it pulls observed pixels to y and leaves the unobserved channel at the prior."""
    sched, N = EDMNoiseScheduler(), 2000
    x0_pred = edm_x0_predictor(GaussianDenoiser(0.0, 1.0), sched)
    mask = torch.zeros(N, 2, dtype=torch.bool)
    mask[:, 0] = True
    guidance = DataConsistencyDPSGuidance(mask, torch.full((N, 2), 2.0), std_y=0.1, gamma=1.0, sigma_fn=sched.sigma)
    dps = DPSScorePredictor(x0_pred, sched.x0_to_score, guidance)
    xN = sched.init_latents((2,), sched.timesteps(32)[:1].expand(N), generator=0)
    with torch.no_grad():
        x = sample(sched.get_denoiser(score_predictor=dps), xN, sched, 32)
    assert abs(x[:, 0].mean().item() - 1.98) < 0.3 and x[:, 0].std().item() < 0.25
    assert abs(x[:, 1].mean().item()) < 0.1 and abs(x[:, 1].std().item() - 1) < 0.1


@pytest.mark.parametrize("overlap,boundary", [(0, 0), (2, 0), (1, 1), (2, 1)])
def test_grid_patching_round_trip(overlap, boundary):
    gp = GridPatching2D((10, 13), (6, 5), overlap_pix=overlap, boundary_pix=boundary)
    x = torch.randn(2, 3, 10, 13)
    patches = gp.apply(x)
    assert patches.shape == (gp.patch_num * 2, 3, 6, 5)
    torch.testing.assert_close(gp.fuse(patches, batch_size=2), x)
    gi = gp.global_index(batch_size=2)
    assert gi.shape == (gp.patch_num, 2, 6, 5) and gi.dtype == torch.int64
    assert gi[:, 0].min() >= 0 and gi[:, 0].max() <= 9 and gi[:, 1].max() <= 12
    for p in range(gp.patch_num):  # every patch pixel is the image pixel at its global index
        for b in range(2):
            torch.testing.assert_close(patches[p * 2 + b], x[b][:, gi[p, 0], gi[p, 1]])


def test_grid_patching_layout_and_errors():
    gp = GridPatching2D((4, 4), (2, 2))
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    gi = gp.global_index()
    assert gp.patch_num == 4 and gi[1, :, 0, 0].tolist() == [2, 0]  # column-major over the grid (x outer)
    torch.testing.assert_close(gp.apply(x)[1, 0], x[0, 0, 2:4, 0:2])
    with pytest.raises(ValueError, match="overlap_pix"):
        GridPatching2D((8, 8), (4, 4), overlap_pix=2, boundary_pix=1)
    with pytest.raises(ValueError, match="patch_num"):
        gp.fuse(torch.zeros(3, 1, 2, 2), batch_size=1)


def test_patch_based_predictor():
    gp = GridPatching2D((8, 10), (4, 6), overlap_pix=2)
    x, t = torch.randn(3, 2, 8, 10), torch.rand(3)
    cond = TensorDict({"img": torch.randn(3, 1, 8, 10), "vec": torch.randn(3, 4)}, batch_size=[3])
    calls = {}

    def predictor(xp, tp, condition=None, global_index=None, scale=1.0):
        calls.update(n=xp.shape[0], gi=global_index, vec=condition["vec"])
        return scale * (xp * tp[:, None, None, None] + condition["img"])

    pp = PatchBasedPredictor(predictor, gp, condition=cond, pass_global_index=True, scale=2.0)
    out = pp(x, t)
    torch.testing.assert_close(out, 2.0 * (x * t[:, None, None, None] + cond["img"]))
    assert calls["n"] == gp.patch_num * 3 and calls["gi"].shape == (gp.patch_num * 3, 2, 4, 6)
    # every row's global_index is the coordinates of the pixels that row holds (any batch size)
    coords = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(10.0), indexing="ij"))
    assert torch.equal(calls["gi"], gp.apply(coords.expand(3, -1, -1, -1)).round().long())
    assert torch.equal(calls["vec"], cond["vec"].repeat(gp.patch_num, 1))
    # drives a sampler like any x0-predictor
    sched = EDMNoiseScheduler()
    D = edm_x0_predictor(GaussianDenoiser(1.0, 0.5), sched)
    xN = sched.init_latents((1, 8, 10), sched.timesteps(6)[:1].expand(2), generator=0)
    ref = sample(sched.get_denoiser(x0_predictor=D), xN, sched, 6)
    got = sample(sched.get_denoiser(x0_predictor=PatchBasedPredictor(D, gp)), xN, sched, 6)
    torch.testing.assert_close(got, ref)
