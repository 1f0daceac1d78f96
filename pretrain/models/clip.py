"""CLIP: a timm vision tower and a transformers text tower, linear projections, a learnable temperature.

``model(batch)`` tokenizes ``batch["text"]`` itself (after MixGen has rewritten the strings) and returns the
symmetric InfoNCE loss computed against the features of every rank (see :mod:`pretrain.objectives`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import ModelOptions, register
from pretrain.models.encoders import (
    TextOptions,
    VisionOptions,
    build_text_encoder,
    build_tokenizer,
    build_vision_encoder,
    vision_width,
)
from pretrain.objectives import ClipLoss

MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass
class ClipOptions(ModelOptions):
    name: str = "clip"
    vision: VisionOptions = dataclasses.field(default_factory=VisionOptions)
    text: TextOptions = dataclasses.field(default_factory=TextOptions)
    embed_dim: int = 512
    image_size: int = 224
    init_logit_scale: float = math.log(1 / 0.07)  # scale 14.3, as in CLIP
    learn_logit_scale: bool = True
    text_pool: Literal["cls", "mean"] = "cls"
    # "longest": pad each batch to its longest caption (MixGen's concatenated captions then cost extra tokens);
    # "max_length": always text.max_length tokens, as open_clip's fixed 77-token context (constant cost)
    text_padding: Literal["longest", "max_length"] = "longest"
    local_loss: bool = True  # rows of this rank vs all gathered columns: memory linear in the batch
    gather_with_grad: bool = True  # needed for the distributed loss to equal the global-batch loss


class Clip(nn.Module):
    """Dual encoder trained with a contrastive (ITC) loss."""

    def __init__(self, opts: ClipOptions) -> None:
        super().__init__()
        self.opts = opts
        self.visual = build_vision_encoder(opts.vision, opts.image_size)
        self.text = build_text_encoder(opts.text)
        self.tokenizer = build_tokenizer(opts.text.name)
        self.image_proj = nn.Linear(vision_width(self.visual), opts.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text.config.hidden_size, opts.embed_dim, bias=False)
        # shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors refuse
        scale = torch.tensor([float(opts.init_logit_scale)])
        if opts.learn_logit_scale:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.loss_fn = ClipLoss(local_loss=opts.local_loss, gather_with_grad=opts.gather_with_grad)

    # -- encoders ---------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask on the model's device (``text_padding``; truncation to ``max_length``)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        tokens = self.tokenizer(
            list(texts),
            padding=self.opts.text_padding,
            truncation=True,
            max_length=self.opts.text.max_length,
            return_tensors="pt",
        )
        device = self.text_proj.weight.device
        return {k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalized image features ``[B, embed_dim]``."""
        images = images.to(self.image_proj.weight.dtype)
        return self.image_proj(self.visual(images))

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected, unnormalized text features ``[B, embed_dim]``."""
        tokens = self.tokenize(texts)
        hidden = self.text(**tokens).last_hidden_state
        if self.opts.text_pool == "cls":
            pooled = hidden[:, 0]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.text_proj(pooled)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalized image embeddings (float32)."""
        return F.normalize(self.image_features(images).float(), dim=-1)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings (float32)."""
        return F.normalize(self.text_features(texts).float(), dim=-1)

    # -- training ---------------------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """exp(logit_scale), clamped to at most 100 in the forward too: with bf16 or ZeRO the in-place clamp of
        :meth:`after_optimizer_step` may act on a copy, so the forward never trusts it alone."""
        return self.logit_scale.float().clamp(0.0, MAX_LOGIT_SCALE).exp().reshape(())

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        image = self.encode_image(batch["image"])
        text = self.encode_text(batch["text"])
        scale = self.scale()
        loss = self.loss_fn(image, text, scale)
        return {"loss": loss, "losses": {"itc": loss.detach()}, "logit_scale": scale.detach()}

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Clamp the temperature parameter to [0, ln 100] (open_clip does this after every step)."""
        if isinstance(self.logit_scale, nn.Parameter) and self.logit_scale.numel() == 1:
            self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D ones (timm's own list, prefixed)."""
        names = {"logit_scale"}
        inner = getattr(self.visual, "no_weight_decay", None)
        if callable(inner):
            names |= {f"visual.{n}" for n in inner()}
        return names


@register("clip", ClipOptions)
def build(opts: ClipOptions) -> Clip:
    return Clip(opts)
