"""TCL: ALBEF plus intra-modal contrastive (IMC) and local mutual-information (LMI) objectives.

Differences from :class:`~pretrain.models.albef.Albef` (everything else is inherited):

* the momentum image encoder sees the second augmented view ``batch["image2"]`` (recipes set ``data.views: 2``);
* IMC: image-image ``image_feat @ [image_feat_m(view 2); image queue] / τ`` and text-text ``text_feat @ [text_feat_m;
  text queue] / τ`` with hard diagonal targets (no distillation);
* LMI (``global_local_loss`` in :mod:`pretrain.objectives`): each sample's online global feature must pick out its
  own momentum local features (image patch features avg-pooled to a ``lmi_grid``×``lmi_grid`` grid; text token
  features without [CLS], padding masked) against the locals of every other sample in the batch;
* loss as in TCL's code: ``mlm + itm + (itc + imc + lmi) / 3``, where each of itc/imc/lmi is the mean of its image and
  text halves (TCL's ``(i2t + t2i + i2i + t2t + i2i_local + t2t_local) / 6``). The weights are options.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from pretrain.models import register
from pretrain.models.albef import Albef, AlbefOptions
from pretrain.models.encoders import token_grid
from pretrain.models.momentum import autocast_like
from pretrain.objectives import global_local_loss, intra_modal_loss, pool_patches


@dataclasses.dataclass
class TclOptions(AlbefOptions):
    name: str = "tcl"
    lmi_grid: int = 4  # image locals: patch features avg-pooled to lmi_grid x lmi_grid (TCL: 16x16 -> 4x4)
    itc_weight: float = 1.0 / 3.0
    imc_weight: float = 1.0 / 3.0
    lmi_weight: float = 1.0 / 3.0


class Tcl(Albef):
    """TCL pretraining model (triple contrastive learning)."""

    def _momentum_images(self, batch: dict[str, Any]) -> torch.Tensor:
        second = batch.get("image2")
        if second is None:
            raise KeyError("TCL needs batch['image2'], the second augmented view: set data.views: 2")
        return second

    def contrastive_losses(self, s: dict[str, Any]) -> dict[str, torch.Tensor]:
        losses = super().contrastive_losses(s)
        temp = s["temp"]
        loss_i2i = intra_modal_loss(s["image_feat"], s["image_feat_all"], temp)
        loss_t2t = intra_modal_loss(s["text_feat"], s["text_feat_all"], temp)
        losses["imc"] = (loss_i2i + loss_t2t) / 2

        with torch.no_grad(), autocast_like(self.temp):
            prefix = getattr(self.visual_encoder_m, "num_prefix_tokens", 1)
            patches = self.vision_proj_m(s["image_embeds_m"][:, prefix:])
            grid = token_grid(self.visual_encoder_m)
            image_local = pool_patches(F.normalize(patches.float(), dim=-1), grid, self.opts.lmi_grid)
            text_local = F.normalize(self.text_proj_m(s["text_hidden_m"][:, 1:]).float(), dim=-1)
        text_mask = s["tokens"].attention_mask[:, 1:]
        loss_i = global_local_loss(image_local, s["image_feat"], temp)
        loss_t = global_local_loss(text_local, s["text_feat"], temp, text_mask)
        losses["lmi"] = (loss_i + loss_t) / 2
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.opts
        contrastive = o.itc_weight * losses["itc"] + o.imc_weight * losses["imc"] + o.lmi_weight * losses["lmi"]
        return contrastive + losses["itm"] + losses["mlm"]


@register("tcl", TclOptions)
def build(opts: TclOptions) -> Tcl:
    return Tcl(opts)
