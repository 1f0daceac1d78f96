"""Momentum distillation in fine-tuning (ALBEF/TCL), shared by the VQA, SNLI-VE and retrieval tasks.

ALBEF fine-tunes every downstream head against a momentum (EMA, m = 0.995) teacher: the pretrained momentum encoders
(``visual_encoder_m``, ``text_encoder_m``, ... kept by the backbone and loaded from the pretrain checkpoint) plus an
EMA twin of each new head, which starts equal to the (randomly initialised) online head. The loss mixes the hard
objective with the teacher's soft predictions: ``(1 - alpha) * hard + alpha * soft``, ``alpha`` = 0.4, either ramped
linearly over the first epoch (ALBEF's ``warm_up: True``: VQA, NLVR2) or constant (SNLI-VE).

:class:`Distiller` owns only the heads' twins (a submodule of the task's training module, so checkpoints keep them
for exact resume); the online heads live on the backbone and are looked up by name at each call, never registered
twice. The EMA step runs after each optimizer update (:class:`finetune.task_module.BackboneTask`), like the
pretraining models: a batch skipped for a non-finite loss leaves the teacher as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.momentum import MomentumModules, ema_update, momentum_copy, momentum_pairs
from pretrain.objectives import ramp_alpha


def has_momentum_encoders(backbone: nn.Module) -> bool:
    """True for backbones with pretrained momentum twins (ALBEF, TCL)."""
    return callable(getattr(backbone, "momentum_pairs", None)) and hasattr(backbone, "momentum")


def ramp(alpha: float, batch: dict[str, Any] | None, warmup: bool) -> float:
    """``alpha``, scaled by ``min(1, step / updates_per_epoch)`` when ``warmup`` (ALBEF's first-epoch ramp, counted
    in optimizer updates: :func:`pretrain.objectives.ramp_alpha`)."""
    if not warmup or batch is None:
        return alpha
    return ramp_alpha(alpha, batch.get("step"), batch.get("updates_per_epoch"))


class Distiller(nn.Module):
    """EMA twins of the backbone attributes ``heads`` plus the backbone's own momentum encoders.

    ``update(backbone)`` moves every twin one EMA step (the encoders' via ``backbone.momentum_pairs()``);
    ``twin(name)`` is the teacher of head ``name``.
    """

    def __init__(self, backbone: nn.Module, heads: Sequence[str], *, momentum: float, alpha: float,
                 warmup: bool) -> None:  # fmt: skip
        super().__init__()
        if not has_momentum_encoders(backbone):
            raise ValueError(f"{type(backbone).__name__} has no momentum encoders to distil from")
        self.names = tuple(heads)
        self.momentum, self.alpha, self.warmup = float(momentum), float(alpha), bool(warmup)
        self.twins = MomentumModules({n: momentum_copy(getattr(backbone, n)) for n in self.names})

    def twin(self, name: str) -> nn.Module:
        return self.twins[name]

    def pairs(self, backbone: nn.Module) -> list[tuple[nn.Parameter, nn.Parameter]]:
        heads = momentum_pairs([getattr(backbone, n) for n in self.names], [self.twins[n] for n in self.names])
        return list(backbone.momentum_pairs()) + heads

    @torch.no_grad()
    def update(self, backbone: nn.Module) -> None:
        ema_update(self.pairs(backbone), self.momentum)

    def alpha_for(self, batch: dict[str, Any] | None) -> float:
        return ramp(self.alpha, batch, self.warmup)


# ============================================================================ losses with a soft teacher term
def soft_ce(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_c softmax(teacher)[b, c] * log_softmax(logits)[b, c]``."""
    return -(F.softmax(teacher_logits.float(), dim=-1) * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def distilled_ce(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor | None,
                 alpha: float) -> torch.Tensor:  # fmt: skip
    """``(1 - alpha) * CE(logits, labels) + alpha * soft_ce(logits, teacher)`` (ALBEF's VE/NLVR2 loss)."""
    hard = F.cross_entropy(logits.float(), labels)
    if teacher_logits is None or alpha == 0.0:
        return hard
    return (1.0 - alpha) * hard + alpha * soft_ce(logits, teacher_logits)


def soft_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ViLT's VQA loss: BCE-with-logits against soft targets, mean over batch x classes, times the class count
    (i.e. the sum over classes, averaged over questions)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * logits.shape[-1]


def distilled_bce(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                  alpha: float) -> torch.Tensor:  # fmt: skip
    """``(1 - alpha) * soft_bce(targets) + alpha * soft_bce(sigmoid(teacher))``: the classifier head's form of
    ALBEF's distillation (each answer is an independent binary decision, so the teacher's sigmoid is the target)."""
    hard = soft_bce(logits, targets)
    if teacher_logits is None or alpha == 0.0:
        return hard
    return (1.0 - alpha) * hard + alpha * soft_bce(logits, torch.sigmoid(teacher_logits.float()))
