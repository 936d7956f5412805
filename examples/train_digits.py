"""Train the quickstart's class-conditional digits model (SongUNet 16×16, 1 channel, 10 classes).

    PYTHONPATH=. python examples/train_digits.py            # resumes from --workdir if a state is there

Data: :func:`diffexport.parity.digits.load_digits16` ("train" split; bilinear ×2 upsampling of
scikit-learn's 8×8 digits, scaled to [-1, 1]). Training: diffexport's ``EDMPreconditioner`` +
``MSEDSMLoss`` with ``EDMNoiseScheduler`` (ln σ ~ N(-1.2, 1.2²), EDM loss weight), Adam, an EMA of
the weights, and the SongUNet's own ``label_dropout`` (whole one-hot vectors zeroed) so the zero
label is the unconditional model of classifier-free guidance. Seeded; every ``--checkpoint-every``
steps it saves a resumable state (model, EMA, optimiser, RNG, losses), the EMA model as a
PhysicsNeMo 2.x ``.mdlus`` (:func:`diffexport.checkpoints.save_model`) and the loss curve PNG, so
stopping at any point leaves a usable checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from tensordict import TensorDict
from torch import Tensor, nn

from diffexport.checkpoints import save_model
from diffexport.diffusion.losses import MSEDSMLoss
from diffexport.diffusion.noise_schedulers import EDMNoiseScheduler
from diffexport.diffusion.preconditioners import EDMPreconditioner
from diffexport.diffusion.utils import ConcatConditionWrapper
from diffexport.models.song_unet import SongUNet
from diffexport.parity.digits import load_digits16, one_hot

REPO = Path(__file__).resolve().parents[1]
MODEL_ARGS = dict(img_resolution=16, in_channels=1, out_channels=1, label_dim=10, model_channels=16,
                  channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[], dropout=0.0, label_dropout=0.1)


def build(seed: int = 0, **overrides) -> EDMPreconditioner:
    """``EDMPreconditioner(ConcatConditionWrapper(SongUNet(**MODEL_ARGS)))``, as the exporter wraps it."""
    torch.manual_seed(seed)
    return EDMPreconditioner(ConcatConditionWrapper(SongUNet(**{**MODEL_ARGS, **overrides})), sigma_data=0.5)


def edm_loss(model: nn.Module) -> MSEDSMLoss:
    """EDM training loss: ln σ ~ N(P_mean=-1.2, P_std=1.2²), weight (σ²+σd²)/(σσd)²."""
    return MSEDSMLoss(model, EDMNoiseScheduler(sigma_data=0.5, P_mean=-1.2, P_std=1.2))


def train_step(model: nn.Module, loss_fn: MSEDSMLoss, opt: torch.optim.Optimizer, x0: Tensor, labels: Tensor) -> float:
    """One Adam step on clean images ``x0`` [B, 1, 16, 16] with int ``labels`` [B]; the loss."""
    model.train()
    condition = TensorDict({"cond_vec": one_hot(labels)}, batch_size=[x0.shape[0]])
    loss = loss_fn(x0, condition=condition)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def plot_losses(losses: list[float], path: Path, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = 50
    smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(losses, alpha=0.25, lw=0.6, label="per step")
    ax.plot(smooth, lw=1.5, label=f"mean of last {k}")
    ax.set(xlabel="step", ylabel="EDM loss", yscale="log", title=f"digits SongUNet, {len(losses)} steps, {seconds / 60:.1f} min")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay (ramped up from 0 over the first steps)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "digits", help="resumable state (not committed)")
    ap.add_argument("--out", type=Path, default=REPO / "recipes" / "models" / "digits.mdlus")
    ap.add_argument("--loss-png", type=Path, default=REPO / "docs" / "digits_loss.png")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    x_all, y_all = load_digits16("train")
    model = build(args.seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = edm_loss(model)
    state_path = args.workdir / "state.pt"
    step, losses, seconds = 0, [], 0.0
    if state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"]), ema.load_state_dict(state["ema"]), opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        step, losses, seconds = int(state["step"]), list(state["losses"]), float(state["seconds"])
        print(f"resumed from {state_path} at step {step}")
    else:
        torch.manual_seed(args.seed)

    def checkpoint() -> None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                    "step": step, "losses": losses, "seconds": seconds}, tmp)
        tmp.replace(state_path)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_model(ema.model.model, args.out)
        plot_losses(losses, args.loss_png, seconds)
        (args.workdir / "summary.json").write_text(json.dumps(
            {"step": step, "minutes": round(seconds / 60, 2), "loss_last100": sum(losses[-100:]) / max(1, len(losses[-100:])),
             "batch": args.batch, "lr": args.lr, "model_args": MODEL_ARGS}, indent=1))

    columns = (TextColumn("digits"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task("train", total=args.steps, completed=step, loss=float("nan"))
        while step < args.steps:
            t0 = time.perf_counter()
            idx = torch.randint(0, len(y_all), (args.batch,))
            lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            losses.append(train_step(model, loss_fn, opt, x_all[idx], y_all[idx]))
            ema_update(ema, model, min(args.ema, (step + 1) / (step + 10)))
            step += 1
            seconds += time.perf_counter() - t0
            bar.update(task, completed=step, loss=sum(losses[-50:]) / len(losses[-50:]))
            if step % args.checkpoint_every == 0 or step == args.steps:
                checkpoint()
    print(f"{step} steps in {seconds / 60:.1f} min; EMA model -> {args.out}, loss curve -> {args.loss_png}")


if __name__ == "__main__":
    main()
