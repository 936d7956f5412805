"""The quickstart's data and judge: scikit-learn's handwritten digits at 16×16, and a small CNN.

Data (exactly): ``sklearn.datasets.load_digits`` (1,797 images, 8×8, integer values 0–16) is
scaled by ``v / 8 - 1`` to [-1, 1], then upsampled ×2 with
``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`` to
float32 [N, 1, 16, 16] (still in [-1, 1]). The split is fixed: 20 % held out, stratified by class,
``train_test_split(random_state=0)``; both the diffusion model and the judge train on ``"train"``
only, so ``"test"`` measures them on digits neither has seen.

The judge (:class:`DigitsJudge`) maps samples [N, 1, 16, 16] to class logits; its 64-dimensional
penultimate activations (:meth:`DigitsJudge.features`) are the statistics of the FID-like distance.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["JUDGE_PATH", "NUM_CLASSES", "DigitsJudge", "load_digits16", "load_judge", "one_hot", "upsample"]

NUM_CLASSES = 10
JUDGE_PATH = Path(__file__).resolve().parents[2] / "recipes" / "models" / "digits_judge.pt"


def upsample(images8: np.ndarray | Tensor) -> Tensor:
    """Digits [N, 8, 8] or [N, 64] with values 0–16 -> float32 [N, 1, 16, 16] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images8), dtype=torch.float32).reshape(-1, 1, 8, 8) / 8 - 1
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False, antialias=False)


def load_digits16(split: Literal["train", "test", "all"] = "train") -> tuple[Tensor, Tensor]:
    """``(images float32 [N, 1, 16, 16] in [-1, 1], labels int64 [N])`` of the fixed split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images, labels = data.images, data.target
    if split != "all":
        train, test = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels)
        pick = {"train": train, "test": test}.get(split)
        if pick is None:
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        images, labels = images[pick], labels[pick]
    return upsample(images), torch.as_tensor(labels, dtype=torch.int64)


def one_hot(labels: Tensor | np.ndarray, num_classes: int = NUM_CLASSES) -> Tensor:
    """int labels [N] -> float32 one-hot [N, num_classes]."""
    return F.one_hot(torch.as_tensor(labels, dtype=torch.int64), num_classes).float()


class DigitsJudge(nn.Module):
    """Two 3×3 conv + max-pool stages (16, 32 channels), a 64-unit feature layer, 10 logits."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 16, feature_dim: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 4 * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations [N, feature_dim] of samples [N, 1, 16, 16] in [-1, 1]."""
        return self.body(x.float().clamp(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_judge(path: str | os.PathLike = JUDGE_PATH) -> DigitsJudge:
    """The shipped judge (a ``weights_only`` state dict), eval mode."""
    judge = DigitsJudge()
    judge.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return judge.eval()
