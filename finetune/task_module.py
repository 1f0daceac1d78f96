"""The training module every fine-tuning task builds: a pretrained backbone plus that task's loss.

:class:`BackboneTask` holds what all of them share: the backbone (its weights saved under ``backbone.``), the
engine hooks delegated to it (``after_optimizer_step``, ``no_weight_decay``) and, for ALBEF/TCL, the momentum
teacher's EMA. The EMA runs in :meth:`BackboneTask.after_optimizer_step`, after each optimizer update that followed
a training forward: the same sequence as ALBEF's EMA at the start of every training forward (the twins start equal
to the online model, so ALBEF's first update is a no-op), but a batch the engine skips for a non-finite loss moves
nothing, as in pretraining.
"""

from __future__ import annotations

import torch
from torch import nn

from finetune.distill import Distiller


class BackboneTask(nn.Module):
    """Base of the fine-tuning training modules: ``backbone`` and an optional momentum ``distiller``.

    A subclass's training forward calls :meth:`distill_alpha` (which marks the EMA as due); a subclass with a
    teacher of its own (not a :class:`~finetune.distill.Distiller`) overrides :meth:`momentum_step`.
    """

    def __init__(self, backbone: nn.Module, distiller: Distiller | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.distiller = distiller
        self._ema_due = False  # a training forward ran since the last EMA

    def distill_alpha(self, batch: dict | None) -> float:
        """The distillation weight for ``batch`` (0 without a distiller); a training forward makes the EMA due."""
        if self.distiller is None:
            return 0.0
        self.mark_ema_due()
        return self.distiller.alpha_for(batch)

    def mark_ema_due(self) -> None:
        """Record that a training forward ran, so the next :meth:`after_optimizer_step` moves the teacher."""
        self._ema_due = self._ema_due or self.training

    @torch.no_grad()
    def momentum_step(self) -> None:
        """One EMA step of the teacher's twins towards the online weights."""
        if self.distiller is not None:
            self.distiller.update(self.backbone)

    def after_optimizer_step(self) -> None:
        """The backbone's own hook (e.g. temperature clamp), then the teacher's EMA if a training forward ran."""
        fn = getattr(self.backbone, "after_optimizer_step", None)
        if callable(fn):
            fn()
        if self._ema_due:
            self.momentum_step()
            self._ema_due = False

    def no_weight_decay(self) -> set[str]:
        """The backbone's no-decay parameter names, under this module's ``backbone.`` prefix."""
        fn = getattr(self.backbone, "no_weight_decay", None)
        return {f"backbone.{n}" for n in fn()} if callable(fn) else set()
