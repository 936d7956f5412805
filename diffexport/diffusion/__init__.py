"""EDM-style diffusion framework mirroring PhysicsNeMo's ``physicsnemo.diffusion`` layering.

Modules: :mod:`.base` (protocols), :mod:`.preconditioners`, :mod:`.noise_schedulers`,
:mod:`.samplers`, :mod:`.losses`, :mod:`.guidance`, :mod:`.multi_diffusion`, :mod:`.utils`.

Typical sampling with an exported engine ``D(x, sigma, **conditions)``::

    scheduler = EDMNoiseScheduler()
    x0_predictor = edm_x0_predictor(engine, scheduler, **conditions)
    denoiser = scheduler.get_denoiser(x0_predictor=x0_predictor)
    xN = scheduler.init_latents((C, H, W), scheduler.timesteps(18)[:1].expand(B), generator=0)
    x0 = sample(denoiser, xN, scheduler, 18, solver="heun", on_step=check_finite)
"""

from diffexport.diffusion.base import (
    DiffusionModel,
    Denoiser,
    EDMDenoiserFn,
    NoiseSource,
    Predictor,
    PredictorType,
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
from diffexport.diffusion.noise_schedulers import (
    DDPMScheduler,
    EDMNoiseScheduler,
    IDDPMNoiseScheduler,
    LinearGaussianNoiseScheduler,
    NoiseScheduler,
    VENoiseScheduler,
    VPNoiseScheduler,
)
from diffexport.diffusion.preconditioners import (
    BaseAffinePreconditioner,
    EDMPreconditioner,
    DDPMPreconditioner,
    IDDPMPreconditioner,
    VEPreconditioner,
    VPPreconditioner,
)
from diffexport.diffusion.samplers import (
    DDIMSolver,
    EDMStochasticEulerSolver,
    EDMStochasticHeunSolver,
    EulerSolver,
    HeunSolver,
    Solver,
    check_finite,
    ddpm_sample,
    round_time_steps,
    sample,
)
from diffexport.diffusion.utils import ConcatConditionWrapper, edm_x0_predictor

__all__ = [
    "BaseAffinePreconditioner",
    "ClassifierFreeGuidance",
    "JointClassifierFreeGuidance",
    "ConcatConditionWrapper",
    "DDIMSolver",
    "DDPMScheduler",
    "DPSScorePredictor",
    "DataConsistencyDPSGuidance",
    "Denoiser",
    "DiffusionModel",
    "EDMDenoiserFn",
    "EDMNoiseScheduler",
    "EDMPreconditioner",
    "EDMStochasticEulerSolver",
    "EDMStochasticHeunSolver",
    "EulerSolver",
    "GridPatching2D",
    "HeunSolver",
    "IDDPMNoiseScheduler",
    "DDPMPreconditioner",
    "IDDPMPreconditioner",
    "LinearGaussianNoiseScheduler",
    "MSEDSMLoss",
    "ModelConsistencyDPSGuidance",
    "NoiseScheduler",
    "NoiseSource",
    "PatchBasedPredictor",
    "Predictor",
    "PredictorType",
    "Solver",
    "VENoiseScheduler",
    "VEPreconditioner",
    "VPNoiseScheduler",
    "VPPreconditioner",
    "check_finite",
    "ddpm_sample",
    "edm_x0_predictor",
    "round_time_steps",
    "sample",
]
