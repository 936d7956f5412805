"""The recipe: everything needed to build, sample, check and deploy one model.

This is the first layer of the data path and imports nothing later: names of model classes and
their arguments are checked against the code by ``diffexport.export.check_recipe`` (which every
build runs before any work).

Every model is strict (``extra="forbid"``, no type coercion beyond int→float), so a typo or a
wrong type fails at load time. Cross-field checks live in ``model_validator``s with messages that
name the field; ``diffexport.recipes.load_recipe`` prefixes them with the file and field path.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

Target = Literal["onnx", "aoti", "tensorrt", "openvino", "auto"]  # auto: every target available, ranked
Precision = Literal["fp32", "fp16", "bf16", "auto"]  # auto: fp32, plus bf16 candidates (export.targets: auto)
PRECONDITIONERS = ("EDMPreconditioner", "VEPreconditioner", "VPPreconditioner", "IDDPMPreconditioner", "DDPMPreconditioner")
SCHEDULERS = ("EDMNoiseScheduler", "VENoiseScheduler", "VPNoiseScheduler", "IDDPMNoiseScheduler", "DDPMScheduler")
SOLVERS = ("euler", "heun", "edm_stochastic_euler", "edm_stochastic_heun", "ddim")  # ddim with eta=1 over all T steps is DDPM
RESERVED_INPUTS = ("x", "sigma", "denoised", "latents", "samples", "seed")
MAX_BATCH = 4096  # engine batch sizes (inputs.batch, parity.batch): beyond this a recipe is a typo, not a plan
MAX_STEPS = 10_000  # sampler steps (DDPM's full chain is 1000)
OPSETS = (18, 23)  # ONNX opsets the exporter writes (torch.onnx's dynamo exporter supports up to 23)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, frozen=True, allow_inf_nan=False)


class Init(Strict):
    """Seeded random weights, used when the model has no checkpoint."""

    seed: int = 0


class ModelSpec(Strict):
    """``class`` and ``args`` may come from a ``.mdlus`` checkpoint's args.json: ``class`` then may be
    left out and ``args`` override single arguments (merged by ``diffexport.export.check_recipe``)."""

    class_name: str | None = Field(None, alias="class")
    args: dict[str, Any] = Field(default_factory=dict)
    checkpoint: str | None = None
    init: Init = Init()

    @model_validator(mode="after")
    def _class_or_checkpoint(self) -> ModelSpec:
        if self.class_name is None and self.checkpoint is None:
            raise ValueError("class: required without a checkpoint (a .mdlus checkpoint names its class)")
        return self


def one_of(what: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` when it is in ``choices``; else a ValueError naming ``what`` and the choices."""
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
    return value


class ClassSpec(Strict):
    """``{class: Name, args: {...}}``; subclasses name the accepted classes."""

    KIND: ClassVar[str]
    CHOICES: ClassVar[tuple[str, ...]]
    class_name: str = Field(alias="class")
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("class_name")
    @classmethod
    def _known(cls, v: str) -> str:
        return one_of(cls.KIND, v, cls.CHOICES)


class PreconditionerSpec(ClassSpec):
    KIND, CHOICES = "preconditioner", PRECONDITIONERS


class SchedulerSpec(ClassSpec):
    KIND, CHOICES = "noise scheduler", SCHEDULERS


class Condition(Strict):
    """A named engine input after ``x`` and ``sigma``.

    ``vector``: [B, *shape] passed to the model as class labels; ``image``: [B, C, H, W]
    concatenated to ``x`` channel-wise before the model; ``index``: [B] int64 (e.g. a lead time).
    """

    name: str
    kind: Literal["vector", "image", "index"]
    shape: list[int] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", v):
            raise ValueError(f"condition name {v!r} must be an identifier")
        if v in RESERVED_INPUTS:
            raise ValueError(f"condition name {v!r} is reserved ({', '.join(RESERVED_INPUTS)})")
        return v

    @model_validator(mode="after")
    def _shape_fits_kind(self) -> Condition:
        rank = {"vector": 1, "image": 3, "index": 0}[self.kind]
        if len(self.shape) != rank or any(d < 1 for d in self.shape):
            raise ValueError(f"shape of a {self.kind} condition must be {rank} positive sizes, got {self.shape}")
        return self


class BatchRange(Strict):
    min: int = Field(1, ge=1, le=MAX_BATCH)
    opt: int = Field(1, ge=1, le=MAX_BATCH)
    max: int = Field(8, ge=1, le=MAX_BATCH)

    @model_validator(mode="after")
    def _ordered(self) -> BatchRange:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"need min <= opt <= max, got min={self.min}, opt={self.opt}, max={self.max}")
        return self


class Inputs(Strict):
    batch: BatchRange = BatchRange()


class Patching(Strict):
    """Multi-diffusion: sample an ``img_shape`` image with a patch-sized engine.

    ``global_index`` (CorrDiff's patch-trained ``SongUNetPosEmbd``): the model's ``img_resolution``
    is the global grid ``img_shape``, the engine takes ``patch_shape`` patches plus each patch's
    ``global_index`` input (int64 [B, 2, h, w], the global row/column of every patch pixel).
    """

    img_shape: list[int] = Field(min_length=2, max_length=2)
    patch_shape: list[int] | None = Field(None, min_length=2, max_length=2)
    overlap_pix: int = Field(0, ge=0)
    boundary_pix: int = Field(0, ge=0)
    global_index: bool = False

    @model_validator(mode="after")
    def _patch_fits(self) -> Patching:
        if self.global_index and self.patch_shape is None:
            raise ValueError("patch_shape: required when global_index is true (the engine's patch size)")
        if self.patch_shape is not None and not all(0 < p <= i for p, i in zip(self.patch_shape, self.img_shape)):
            raise ValueError(f"patch_shape {self.patch_shape} must be positive and fit in img_shape {self.img_shape}")
        return self


class Guidance(Strict):
    """Classifier-free guidance (``diffexport.diffusion.guidance.ClassifierFreeGuidance``):
    ``uncond + cfg (cond - uncond)``, the unconditional call with the vector condition zeroed (as
    label dropout trains it); ``cfg: 1`` is plain conditional sampling."""

    cfg: float = Field(ge=0)


class Sampler(Strict):
    scheduler: SchedulerSpec
    solver: str = "heun"
    num_steps: int = Field(18, ge=1, le=MAX_STEPS)
    solver_options: dict[str, Any] = Field(default_factory=dict)
    patching: Patching | None = None
    guidance: Guidance | None = None
    clip: list[float] | None = Field(None, min_length=2, max_length=2)  # [lo, hi]: the data range final samples are clamped to

    @field_validator("clip")
    @classmethod
    def _ordered_clip(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"clip must be [lo, hi] with lo < hi, got {v}")
        return v

    @field_validator("solver")
    @classmethod
    def _known(cls, v: str) -> str:
        return one_of("solver", v, SOLVERS)


class Export(Strict):
    """``targets: auto`` builds every target available here, checks each, benchmarks those that pass
    and makes the fastest the engine's default backend (``precision: auto`` adds bf16 candidates)."""

    targets: list[Target] = Field(default_factory=lambda: ["auto"])
    precision: Precision = "fp32"
    opset: int = Field(21, ge=OPSETS[0], le=OPSETS[1])  # 21: GroupNormalization as one op (18: InstanceNormalization form)
    device: Literal["cpu", "cuda"] = "cpu"

    @field_validator("targets", mode="before")
    @classmethod
    def _auto(cls, v: Any) -> Any:
        return ["auto"] if v == "auto" else v  # ``targets: auto`` in YAML

    @field_validator("targets")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one target, or auto")
        if len(set(v)) != len(v):
            raise ValueError(f"targets repeat: {v}")
        if "auto" in v and len(v) > 1:
            raise ValueError(f"auto stands alone (it means every available target), got {v}")
        return v

    @property
    def auto(self) -> bool:
        """``targets: auto``: build every available target and rank those that pass parity."""
        return self.targets == ["auto"]

    @model_validator(mode="after")
    def _auto_precision(self) -> Export:
        if self.precision == "auto" and not self.auto:
            raise ValueError("precision: auto needs targets: auto (it adds bf16 candidates to the ranking)")
        return self


class Judge(Strict):
    """Task-level parity (``diffexport.parity.task``): ``name`` is ``digits`` (the shipped digits
    classifier) or ``module:callable`` (samples [N, C, H, W] -> labels [N] or (labels, features)).
    ``samples`` seeded samples per backend, requested classes cycling 0..K-1; gates: class agreement
    with the reference, Fréchet distance of the judge's features to the reference's, and the share
    of samples the judge classifies as requested."""

    name: str
    samples: int = Field(100, ge=2)
    seed: int = 0
    min_agreement: float = Field(0.97, ge=0, le=1)
    max_frechet: float | None = Field(None, ge=0)
    min_accuracy: float | None = Field(None, ge=0, le=1)


class Parity(Strict):
    """Parity checks run as the last build stage. Tolerances default to the precision's preset."""

    enabled: bool = True
    num_sigmas: int = Field(8, ge=2, le=1000)
    batch: int = Field(2, ge=1, le=MAX_BATCH)
    seed: int = 0
    per_call_rtol: float | None = Field(None, gt=0)
    per_call_f_rtol: float | None = Field(None, gt=0)  # of the network's prediction F = (D - c_skip x) / c_out
    final_rtol: float | None = Field(None, gt=0)
    judge: Judge | None = None


class Deploy(Strict):
    triton: bool = False
    triton_python_only: bool = False
    triton_instances: int = Field(1, ge=1, le=64)
    triton_queue_delay_ms: float = Field(20.0, ge=0, le=60_000)  # the sampler's dynamic-batching wait
    cpp: bool = False


class Recipe(Strict):
    name: str
    model: ModelSpec
    preconditioner: PreconditionerSpec = PreconditionerSpec(class_name="EDMPreconditioner")
    conditions: list[Condition] = Field(default_factory=list)
    inputs: Inputs = Inputs()
    sampler: Sampler
    export: Export = Export()
    parity: Parity = Parity()
    deploy: Deploy = Deploy()
    output: str | None = None
    _source: Path | None = PrivateAttr(None)  # the YAML file, for resolving relative paths

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", v):
            raise ValueError(f"name {v!r} must be letters, digits, '.', '_' or '-' (it names a directory and Triton models)")
        return v

    @model_validator(mode="after")
    def _conditions_unique(self) -> Recipe:
        names = [c.name for c in self.conditions]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"conditions: duplicate name(s) {', '.join(dup)}")
        if sum(c.kind == "vector" for c in self.conditions) > 1:
            raise ValueError("conditions: at most one vector condition (it feeds the model's class labels)")
        if self.sampler.guidance is not None and not any(c.kind == "vector" for c in self.conditions):
            raise ValueError("sampler.guidance: classifier-free guidance needs a vector condition (the class labels it zeroes)")
        if self.sampler.guidance is not None and self.sampler.guidance.cfg != 1 and self.sampler.patching is not None:
            raise ValueError("sampler.guidance: classifier-free guidance is not supported with sampler.patching (use one of them)")
        return self
