"""ALBEF: align before fuse (ITC with momentum distillation, ITM with hard negatives, MLM with distillation).

A timm ViT and a :class:`~pretrain.models.fusion.FusionBert` text encoder (text-only lower half, cross-attention to
image tokens in the upper half), 256-d projections, a learnable temperature, momentum (EMA) copies of encoders,
projections and MLM head, and queues of momentum features. The objectives themselves live in
:mod:`pretrain.objectives` (:func:`~pretrain.objectives.momentum_itc`, :func:`~pretrain.objectives.hard_negative_itm`,
:func:`~pretrain.objectives.mask_tokens`, :func:`~pretrain.objectives.mlm_distill_loss`); this file wires the
model's encoders into them.

``model(batch)`` reads ``batch["image"]`` and the list ``batch["text"]`` (tokenized here, after MixGen) and, for the
α ramp, ``batch["step"]``/``batch["updates_per_epoch"]`` (set by the engine; without them α is at its full value).

Model state changes only through the engine's two hooks (see :mod:`pretrain.protocol`): a training forward leaves
its momentum features pending, :meth:`Albef.commit_step` enqueues them once the step's loss is agreed finite, and
:meth:`Albef.after_optimizer_step` runs the EMA. A batch skipped for a non-finite loss therefore changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.bert.modeling_bert import BertOnlyMLMHead

from launch.config import ConfigError
from pretrain.models import ModelOptions, register
from pretrain.models.encoders import (
    TextOptions,
    VisionOptions,
    build_text_encoder,
    build_tokenizer,
    build_vision_encoder,
    load_mlm_head,
    mlm_excluded_ids,
    text_config,
    vision_width,
)
from pretrain.models.fusion import FusionBert, PairMode
from pretrain.models.momentum import (
    FeatureQueues,
    MomentumModules,
    autocast_like,
    copy_params,
    ema_update,
    momentum_copy,
    momentum_pairs,
)
from pretrain.objectives import (
    IGNORE,
    hard_negative_itm,
    mask_tokens,
    mlm_distill_loss,
    momentum_itc,
    ramp_alpha,
)

TEMP_MIN, TEMP_MAX = 0.001, 0.5


@dataclasses.dataclass
class AlbefOptions(ModelOptions):
    name: str = "albef"
    vision: VisionOptions = dataclasses.field(default_factory=VisionOptions)
    # ALBEF/TCL tokenize pretraining captions at 25 tokens (Pretrain.py); with MixGen's concatenated captions this
    # decides how much of the second caption survives
    text: TextOptions = dataclasses.field(default_factory=lambda: TextOptions(max_length=25))
    image_size: int = 256
    fusion_layer: int | None = None  # None: half of the text layers (ALBEF: 6 of 12)
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536  # must be a multiple of data.batch_size x world size
    momentum: float = 0.995
    alpha: float = 0.4  # distillation weight, ramped linearly over the first epoch
    distill: bool = True
    mlm_probability: float = 0.15
    # tokens MLM never selects: ALBEF excludes [PAD] and [CLS] only; "sep" also excludes the trailing [SEP] that
    # transformers' tokenizer appends and ALBEF's own tokenizer never writes (so the candidates are ALBEF's)
    mlm_exclude: list[str] = dataclasses.field(default_factory=lambda: ["pad", "cls", "sep"])
    tie_mlm_head: bool = True  # tie the MLM decoder to the word embeddings (BERT/ALBEF do; see docs/models.md)
    itm_skip_same_text: bool = True  # never draw a hard negative whose caption equals the anchor's (false negative)
    # what the text layers hand on as [CLS]: "cls" (ALBEF, BERT) or "mean", the masked mean of the tokens, for
    # mean-pooled sentence towers (minilm) whose intermediate [CLS] is the same vector for every caption
    text_pool: Literal["cls", "mean"] = "cls"

    def validate(self, recipe: Any) -> None:
        ds = getattr(recipe, "deepspeed", None)
        if ds is not None and int(ds.zero_stage) == 3:
            raise ConfigError(
                f"deepspeed.zero_stage=3 is not supported for model '{self.name}': its momentum (EMA) encoder reads "
                "and writes full parameters, which ZeRO-3 partitions across ranks; use stage 1 or 2"
            )


class Tokens(NamedTuple):
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


# ============================================================================ model
class Albef(nn.Module):
    """ALBEF pretraining model; also the encoder/fusion provider for fine-tuning heads."""

    has_momentum = True  # EMA encoders (AlbefOptions.validate refuses ZeRO-3: the EMA reads every full parameter)
    queue_names: tuple[str, ...] = ("image", "text")

    def __init__(self, opts: AlbefOptions) -> None:
        super().__init__()
        self.opts = opts
        self.tokenizer = build_tokenizer(opts.text.name)
        cfg = text_config(opts.text)
        # a CNN tower's final feature map becomes image tokens projected to the fusion width
        self.visual_encoder = build_vision_encoder(opts.vision, opts.image_size, token_width=cfg.hidden_size)
        width = vision_width(self.visual_encoder)
        fusion_layer = cfg.num_hidden_layers // 2 if opts.fusion_layer is None else opts.fusion_layer
        self.text_encoder = FusionBert(cfg, fusion_layer, encoder_width=width, text_pool=opts.text_pool)
        if opts.text.pretrained:
            self.text_encoder.load_text_weights(build_text_encoder(opts.text).state_dict())
        hidden = cfg.hidden_size
        self.vision_proj = nn.Linear(width, opts.embed_dim)
        self.text_proj = nn.Linear(hidden, opts.embed_dim)
        self.itm_head = nn.Linear(hidden, 2)
        self.mlm_head = BertOnlyMLMHead(cfg)
        self.mlm_head.apply(self.text_encoder._init_weights)
        # transformers keeps a spare ``bias`` beside ``decoder.bias`` (tied by its PreTrainedModel machinery, which
        # we do not use); the forward only reads decoder.bias, so drop the spare: no unused or shared tensor
        del self.mlm_head.predictions.bias
        if opts.tie_mlm_head:
            self.mlm_head.predictions.decoder.weight = self.text_encoder.embeddings.word_embeddings.weight
        self.mlm_head_pretrained = False
        if opts.text.pretrained:
            self.mlm_head_pretrained = load_mlm_head(self.mlm_head, opts.text, tied=opts.tie_mlm_head)
        # shape [1], not a 0-dim scalar: DeepSpeed broadcasts parameters as byte views, which 0-dim tensors refuse
        self.temp = nn.Parameter(torch.full((1,), float(opts.temp)))
        self.vocab_size = cfg.vocab_size
        self.special_ids = mlm_excluded_ids(self.tokenizer, opts.mlm_exclude)

        # momentum twins (float32, see momentum.py); text encoder and MLM head are copied together so a tie survives
        text_and_head = momentum_copy(nn.ModuleList([self.text_encoder, self.mlm_head]))
        self.momentum = MomentumModules(
            {
                "visual_encoder": momentum_copy(self.visual_encoder),
                "vision_proj": momentum_copy(self.vision_proj),
                "text_encoder": text_and_head[0],
                "mlm_head": text_and_head[1],
                "text_proj": momentum_copy(self.text_proj),
            }
        )
        copy_params(self.momentum_pairs())
        self._pending: dict[str, torch.Tensor] | None = None  # momentum features awaiting commit_step
        self._ema_due = False  # a training forward ran since the last EMA
        self.queues = FeatureQueues(self.queue_names, opts.embed_dim, opts.queue_size)

    # momentum twins by ALBEF's names
    @property
    def visual_encoder_m(self) -> nn.Module:
        return self.momentum["visual_encoder"]

    @property
    def vision_proj_m(self) -> nn.Module:
        return self.momentum["vision_proj"]

    @property
    def text_encoder_m(self) -> FusionBert:
        return self.momentum["text_encoder"]

    @property
    def mlm_head_m(self) -> nn.Module:
        return self.momentum["mlm_head"]

    @property
    def text_proj_m(self) -> nn.Module:
        return self.momentum["text_proj"]

    # -------------------------------------------------------------------- public encoders
    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Token ids and attention mask on the model's device (pad to longest, truncate to text.max_length)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.opts.text.max_length, return_tensors="pt"
        )
        device = self.temp.device
        return Tokens(enc["input_ids"].to(device), enc["attention_mask"].to(device))

    def _tokens(self, text: Sequence[str] | Tokens | dict[str, torch.Tensor]) -> Tokens:
        if isinstance(text, Tokens):
            return text
        if isinstance(text, dict):
            return Tokens(text["input_ids"], text["attention_mask"])
        return self.tokenize(text)

    def _vision_tokens(self, encoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
        dtype = next(encoder.parameters()).dtype
        return encoder.forward_features(images.to(dtype))

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image_embeds [B, 1+N, D] tokens, normalised CLS feature [B, embed_dim])``."""
        embeds = self._vision_tokens(self.visual_encoder, images)
        return embeds, F.normalize(self.vision_proj(embeds[:, 0]).float(), dim=-1)

    def encode_text(self, text: Sequence[str] | Tokens | dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(text_embeds [B, L, H] from the text-only layers, normalised CLS feature [B, embed_dim])``."""
        tokens = self._tokens(text)
        embeds = self.text_encoder(tokens.input_ids, tokens.attention_mask, mode="text")
        return embeds, F.normalize(self.text_proj(embeds[:, 0]).float(), dim=-1)

    def fuse(
        self,
        image_embeds: torch.Tensor | Sequence[torch.Tensor],
        text: Sequence[str] | Tokens | dict[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor],
        image_atts: torch.Tensor | Sequence[torch.Tensor] | None = None,
        pair_mode: PairMode = "alternate",
    ) -> torch.Tensor:
        """Multimodal hidden states ``[B, L, H]`` (CLS at 0) of texts over one or several image token sets.

        ``text`` is raw strings / :class:`Tokens` (run through the text layers first) or ``(text_embeds,
        attention_mask)`` from :meth:`encode_text`. Several images per text (NLVR2): pass a list of ``[B, N, D]``;
        ``pair_mode`` picks ALBEF's alternating rule or concatenation (see :mod:`pretrain.models.fusion`).
        Cross-attention maps for Grad-CAM: ``self.text_encoder.set_save_attention(True)`` before the call.
        """
        if isinstance(text, tuple) and not isinstance(text, Tokens):
            embeds, mask = text
        else:
            tokens = self._tokens(text)
            mask = tokens.attention_mask
            embeds = self.text_encoder(tokens.input_ids, mask, mode="text")
        return self.text_encoder(
            attention_mask=mask,
            hidden_states=embeds,
            image_embeds=image_embeds,
            image_atts=image_atts,
            mode="fusion",
            pair_mode=pair_mode,
        )

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """ITM logits ``[B, 2]`` (index 1 = match) from fused hidden states."""
        return self.itm_head(fused[:, 0]).float()

    # -------------------------------------------------------------------- training
    def temperature(self) -> torch.Tensor:
        """The temperature, clamped to [0.001, 0.5] in the forward as well as in place (bf16/ZeRO copies)."""
        with torch.no_grad():
            self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        return self.temp.float().clamp(TEMP_MIN, TEMP_MAX).squeeze(0)

    def momentum_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(online, momentum) parameter pairs, looked up each time (robust to parameters replaced by a wrapper)."""
        names = ("visual_encoder", "vision_proj", "text_encoder", "mlm_head", "text_proj")
        # text encoder + MLM head as one unit: a tied decoder weight is then one pair, not two
        online = [getattr(self, n) for n in names]
        twins = [self.momentum[n] for n in names]
        online = online[:2] + [nn.ModuleList(online[2:4])] + online[4:]
        twins = twins[:2] + [nn.ModuleList(twins[2:4])] + twins[4:]
        return momentum_pairs(online, twins)

    @torch.no_grad()
    def momentum_update(self) -> None:
        ema_update(self.momentum_pairs(), self.opts.momentum)

    def _momentum_images(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the momentum image encoder sees (ALBEF: the same view; TCL overrides with the second view)."""
        return batch["image"]

    def alpha(self, batch: dict[str, Any]) -> float:
        """The distillation weight of this batch (0 without distillation)."""
        if not self.opts.distill:
            return 0.0
        return ramp_alpha(self.opts.alpha, batch.get("step"), batch.get("updates_per_epoch"))

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = batch["image"]
        texts = batch["text"]
        if not isinstance(texts, list):
            raise TypeError(f"batch['text'] must be a list of str, got {type(texts).__name__}")
        bsz = images.shape[0]
        if self.training:
            self.queues.check_batch(bsz)
        alpha = self.alpha(batch)
        temp = self.temperature()
        tokens = self.tokenize(texts)

        image_embeds, image_feat = self.encode_image(images)
        text_embeds, text_feat = self.encode_text(tokens)
        with torch.no_grad(), autocast_like(self.temp):
            image_embeds_m = self._vision_tokens(self.visual_encoder_m, self._momentum_images(batch))
            image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0]).float(), dim=-1)
            text_hidden_m = self.text_encoder_m(tokens.input_ids, tokens.attention_mask, mode="text")
            text_feat_m = F.normalize(self.text_proj_m(text_hidden_m[:, 0]).float(), dim=-1)
            image_feat_all = torch.cat([image_feat_m, self.queues.get("image").float()], dim=0)
            text_feat_all = torch.cat([text_feat_m, self.queues.get("text").float()], dim=0)

        state = {
            "tokens": tokens,
            "texts": texts,
            "temp": temp,
            "alpha": alpha,
            "image_embeds": image_embeds,
            "image_feat": image_feat,
            "text_embeds": text_embeds,
            "text_feat": text_feat,
            "image_embeds_m": image_embeds_m,
            "image_feat_m": image_feat_m,
            "text_hidden_m": text_hidden_m,
            "text_feat_m": text_feat_m,
            "image_feat_all": image_feat_all,
            "text_feat_all": text_feat_all,
        }
        losses = self.contrastive_losses(state)
        losses["itm"] = self.itm_loss(state)
        losses["mlm"] = self.mlm_loss(state)
        # enqueued by commit_step, once the engine has agreed this loss is finite on every rank
        self._pending = {"image": image_feat_m, "text": text_feat_m} if self.training else None
        self._ema_due = self._ema_due or self.training  # fine-tuning heads that bypass forward keep the twins
        loss = self.total_loss(losses)
        return {
            "loss": loss,
            "losses": {k: v.detach() for k, v in losses.items()},
            "temp": temp.detach(),
            "alpha": alpha,
        }

    @torch.no_grad()
    def commit_step(self) -> None:
        """Enqueue the momentum features of the last training forward (a collective: every rank calls it)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.queues.enqueue(**pending)

    def discard_step(self) -> None:
        """Drop the pending state of a batch the engine skipped."""
        self._pending = None

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """ALBEF: the unweighted sum ITC + ITM + MLM."""
        return losses["itc"] + losses["itm"] + losses["mlm"]

    def contrastive_losses(self, s: dict[str, Any]) -> dict[str, torch.Tensor]:
        """ITC with momentum distillation against [momentum batch features; queue]; stores the batch similarities
        (``sim_i2t``/``sim_t2i`` over the first B columns) in ``s`` for the hard-negative draw."""
        out = momentum_itc(
            s["image_feat"], s["text_feat"], s["image_feat_all"], s["text_feat_all"], s["temp"], s["alpha"]
        )
        s["sim_i2t"], s["sim_t2i"] = out.sim_i2t, out.sim_t2i
        return {"itc": out.loss}

    def _exclude_same_text(self, texts: list[str], device: torch.device) -> torch.Tensor | None:
        if not self.opts.itm_skip_same_text:
            return None
        ids = {t: i for i, t in enumerate(texts)}
        codes = torch.tensor([ids[t] for t in texts], device=device)
        return codes[:, None] == codes[None, :]

    def itm_score(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITM logits ``[N, 2]`` of (image tokens, text-layer states + mask) pairs: one fusion pass."""
        return self.itm_logits(self.fuse(image_embeds, (text_embeds, mask)))

    def itm_loss(self, s: dict[str, Any]) -> torch.Tensor:
        """ITM over B positives and 2B hard negatives (one negative image per text, one negative text per image)."""
        exclude = self._exclude_same_text(s["texts"], s["image_embeds"].device)
        out = hard_negative_itm(
            self.itm_score,
            s["image_embeds"],
            s["text_embeds"],
            s["tokens"].attention_mask,
            s["sim_i2t"],
            s["sim_t2i"],
            exclude,
        )
        return out.loss

    def mlm_loss(self, s: dict[str, Any]) -> torch.Tensor:
        """Masked LM in full multimodal mode, distilled from the momentum model's predictions (the teacher sees
        the same masked text and the momentum image tokens)."""
        tokens = s["tokens"]
        ids, labels = mask_tokens(
            tokens.input_ids,
            vocab_size=self.vocab_size,
            mask_token_id=self.tokenizer.mask_token_id,
            special_ids=self.special_ids,
            probability=self.opts.mlm_probability,
        )
        keep = labels != IGNORE
        hidden = self.text_encoder(ids, tokens.attention_mask, image_embeds=s["image_embeds"], mode="multimodal")
        # the vocabulary projection only at masked positions: same loss, far less memory
        logits = self.mlm_head(hidden[keep])
        logits_m = None
        if s["alpha"] > 0.0 and bool(keep.any()):
            with torch.no_grad(), autocast_like(self.temp):
                hidden_m = self.text_encoder_m(
                    ids, tokens.attention_mask, image_embeds=s["image_embeds_m"], mode="multimodal"
                )
                logits_m = self.mlm_head_m(hidden_m[keep])
        return mlm_distill_loss(logits, labels[keep], logits_m, s["alpha"])

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Clamp the temperature and run the EMA of the momentum twins.

        ALBEF runs the EMA at the start of every training forward; running it after each optimizer update is the
        same sequence (the twins start equal to the online model, so ALBEF's first update is a no-op) and leaves
        a batch skipped for a non-finite loss without effect.
        """
        self.temp.clamp_(TEMP_MIN, TEMP_MAX)
        if self._ema_due:
            self.momentum_update()
            self._ema_due = False

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D ones (the temperature and timm's own list)."""
        names = {"temp"}
        inner = getattr(self.visual_encoder, "no_weight_decay", None)
        if callable(inner):
            names |= {f"visual_encoder.{n}" for n in inner()}
        return names


@register("albef", AlbefOptions)
def build(opts: AlbefOptions) -> Albef:
    return Albef(opts)
