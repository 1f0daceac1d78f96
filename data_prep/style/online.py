"""Online style randomization inside a training step (GPU or CPU), on already *normalized* batches.

Use it in the training process after the batch reaches the device, not in DataLoader workers (CUDA in forked
workers fails; the public code's issue #8)::

    aug = OnlineStyleAugment(randomizer, mean=CLIP_MEAN, std=CLIP_STD, ratio="1:1")
    batch["image"] = aug(batch["image"], generator=gen)   # gen seeded from (seed, step, rank)

A fraction of the batch (probability ``p`` per image, or ``ratio`` "u:a" meaning p = a/(u+a)) is de-normalized to
[0, 1], stylized with a fresh z per image, and normalized back; the rest is returned unchanged. Randomness comes only
from ``generator`` (CPU), so a resumed run that reseeds it stylizes the same images with the same styles.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .sampling import StyleRandomizer, parse_ratio


class OnlineStyleAugment(nn.Module):
    """Stylize a random subset of a normalized image batch; ``forward(images, generator) -> images``."""

    def __init__(
        self,
        randomizer: StyleRandomizer,
        mean: Sequence[float],
        std: Sequence[float],
        p: float = 0.5,
        ratio: str | None = None,
        alpha: float | None = None,
    ) -> None:
        super().__init__()
        if ratio is not None:
            u, a = parse_ratio(ratio)
            p = a / (u + a)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got {mean}, {std}")
        self.randomizer = randomizer
        self.p = p
        self.alpha = alpha
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def apply(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (images with the chosen ones stylized, bool mask [B] of the stylized ones)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a normalized [B,3,H,W] batch, got {tuple(images.shape)}")
        n = images.shape[0]
        # Both draws happen every call, whatever the mask, so the generator advances by a fixed amount per batch.
        mask = torch.rand(n, generator=generator) < self.p
        z_rand = self.randomizer.sampler.sample(n, generator)
        if not bool(mask.any()):
            return images, mask
        idx = mask.nonzero().flatten()
        mean = self.mean.to(images.device)
        std = self.std.to(images.device)
        with torch.no_grad():
            sub = images[idx.to(images.device)].float() * std + mean
            styled = self.randomizer(sub.clamp_(0, 1), z_rand=z_rand[idx], alpha=self.alpha)
            styled = ((styled.to(images.device) - mean) / std).to(images.dtype)
        out = images.clone()
        out[idx.to(images.device)] = styled
        return out, mask

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, generator)[0]


__all__ = ["OnlineStyleAugment"]
