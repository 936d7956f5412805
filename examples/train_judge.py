"""Train the digits judge: the small CNN that task-level parity uses to say which digit a sample is.

    PYTHONPATH=. python examples/train_judge.py

Trained on the "train" split of :func:`diffexport.parity.digits.load_digits16` (random ±1 pixel
shifts as augmentation), seeded; reports accuracy on the held-out "test" split and writes a
``weights_only`` state dict to ``recipes/models/digits_judge.pt``. About a minute on one core.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from diffexport.parity.digits import JUDGE_PATH, DigitsJudge, load_digits16


def shift(x: Tensor, generator: torch.Generator) -> Tensor:
    """Each image moved by a random integer offset in {-1, 0, 1}² (background -1 fills in)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=generator)
    return torch.stack([padded[i, :, dy[i]: dy[i] + 16, dx[i]: dx[i] + 16] for i in range(x.shape[0])])


@torch.no_grad()
def accuracy(judge: DigitsJudge, x: Tensor, y: Tensor) -> float:
    return float((judge.eval()(x).argmax(1) == y).float().mean())


def train(epochs: int = 30, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> DigitsJudge:
    x, y = load_digits16("train")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    judge = DigitsJudge()
    opt = torch.optim.Adam(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        judge.train()
        for idx in torch.randperm(len(y), generator=g).split(batch):
            loss = F.cross_entropy(judge(shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    return judge.eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=JUDGE_PATH)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    judge = train(args.epochs, seed=args.seed)
    result = {"train_accuracy": accuracy(judge, *load_digits16("train")), "test_accuracy": accuracy(judge, *load_digits16("test"))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(judge.state_dict(), args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
