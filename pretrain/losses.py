"""Contrastive losses with an autograd-aware feature gather (open_clip's ``local_loss + gather_with_grad`` scheme).

Each rank scores its own B features against the features of all ranks (B x B·world logits), with targets offset by
``rank * B``. With the gather carrying gradients back to their owners, the summed gradient over ranks equals the
gradient of the same loss computed on the global batch in one process, while memory stays linear in B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns to each rank the summed gradient of its own slice.

    Written here rather than using ``torch.distributed.nn.all_gather`` (deprecated in torch 2.14, its successor
    is a private API); an all-reduce in backward works on every backend, gloo included.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's slice
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_features(x: torch.Tensor, gather_with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` ``[B, D]`` from every rank along dim 0 (rank order); identity when not distributed.

    With ``gather_with_grad`` the gather is autograd-aware: its backward sends each slice's summed gradient back
    to the rank that produced it (every rank must pass the same batch size). Without it, other ranks' slices
    are constants and only the local slice (re-inserted at this rank's position) carries gradient.
    """
    if not _distributed():
        return x
    if gather_with_grad:
        return _AllGather.apply(x)
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def contrastive_targets(batch_size: int, device: torch.device | str = "cpu", rank: int | None = None) -> torch.Tensor:
    """Indices of the positive pairs of this rank's rows among the gathered columns: ``arange(B) + rank * B``."""
    if rank is None:
        rank = dist.get_rank() if _distributed() else 0
    return torch.arange(batch_size, device=device) + rank * batch_size


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between L2-normalized image and text features.

    ``local_loss=True`` computes the rows of this rank only (B x N logits, N = global batch); ``False`` builds the
    full N x N matrix on every rank (each rank then holds the whole loss; use it only for checking).
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def logits(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text), rows = this rank's samples when ``local_loss``."""
        all_image = gather_features(image, self.gather_with_grad)
        all_text = gather_features(text, self.gather_with_grad)
        if self.local_loss:
            return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T
        per_image = logit_scale * all_image @ all_text.T
        return per_image, per_image.T

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
        per_image, per_text = self.logits(image, text, logit_scale)
        if self.local_loss:
            targets = contrastive_targets(image.shape[0], image.device)
        else:
            targets = torch.arange(per_image.shape[0], device=image.device)
        return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2
