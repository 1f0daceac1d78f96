"""ViLT (Kim et al., 2021): one transformer over word embeddings and image patch embeddings.

Layout, as in ViLT: text = BERT-style embeddings (word + position + LayerNorm, ``max_text_len`` positions) of a
bert-base-uncased vocabulary; image = a timm ViT's patch embedding, class token and position embedding; a
modality type embedding is added to each part (0 text, 1 image, 2 the second image of an NLVR2 pair); the
concatenation runs through the **ViT's own blocks and final norm** (ViLT initialises its transformer from a ViT,
so ``model.vision.pretrained`` loads ViT weights straight into the fusion transformer); a dense+tanh pooler on
the text [CLS] feeds the ITM head.

Text embeddings: built with transformers' ``BertEmbeddings``; with ``model.text.pretrained`` they start from the
text tower's embeddings (the ``minilm`` BERT, hidden 384, matching ViT-S), which needs equal widths; ViLT itself
starts them from random (``text.pretrained: false``, as in ``configs/pretrain/vilt.yaml``).

Images are fixed-size squares (``model.image_size``), so there is no zero padding and no patch mask: mixing
images in normalized space (MixGen) is exact (see docs/mixgen.md).

Objectives: ITM (half the rows get another row's image, ViLT's rule with in-batch instead of dataset-drawn
negatives), MLM with whole-word masking (15 %, 80/10/10), and optionally word-patch alignment (WPA: IPOT optimal
transport between text tokens and patches, ``0.1 * (mean distance of positives - of negatives)``). The objective
functions live in :mod:`pretrain.objectives`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launch.config import ConfigError
from pretrain.models import ModelOptions, register
from pretrain.models.encoders import (
    TextOptions,
    VisionOptions,
    build_text_encoder,
    build_tokenizer,
    build_vision_encoder,
    text_config,
)
from pretrain.objectives import IGNORE, itm_negatives, mask_words, wpa_distance, wpa_loss


def _vilt_vision() -> VisionOptions:
    return VisionOptions(name="vit_small_patch32_384")


@dataclasses.dataclass
class ViltOptions(ModelOptions):
    name: str = "vilt"
    vision: VisionOptions = dataclasses.field(default_factory=_vilt_vision)  # the fusion transformer
    # tokenizer + (optional) embedding init; text.max_length is unused (max_text_len below rules)
    text: TextOptions = dataclasses.field(default_factory=TextOptions)
    image_size: int = 384  # square input; must equal data.image_size
    hidden_size: int | None = None  # ViT width override (embed_dim); None: the named ViT's
    depth: int | None = None  # number of transformer blocks; None: the named ViT's
    num_heads: int | None = None
    drop: float = 0.1  # dropout in embeddings, attention and MLPs (ViLT: 0.1)
    max_text_len: int = 40  # position embeddings; MixGen-concatenated captions are truncated here
    mlm_probability: float = 0.15
    whole_word_masking: bool = True
    itm_weight: float = 1.0
    mlm_weight: float = 1.0
    wpa: bool = False  # word-patch alignment (IPOT) on the ITM pass
    wpa_weight: float = 0.1
    wpa_iterations: int = 50
    wpa_beta: float = 0.5

    def validate(self) -> None:
        if self.max_text_len < 3:
            raise ConfigError("model.max_text_len: must be >= 3 ([CLS] word [SEP])")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError("model.mlm_probability: must be in (0, 1)")
        if self.image_size < 1:
            raise ConfigError("model.image_size: must be >= 1")
        if self.itm_weight < 0 or self.mlm_weight < 0 or self.wpa_weight < 0:
            raise ConfigError("model.*_weight: loss weights must be >= 0")


class Vilt(nn.Module):
    """Single-stream vision-and-language transformer with ITM, MLM and optional WPA pretraining heads."""

    def __init__(self, opts: ViltOptions) -> None:
        super().__init__()
        opts.validate()
        self.opts = opts
        kwargs = dict(opts.vision.kwargs)
        for key, value in (("embed_dim", opts.hidden_size), ("depth", opts.depth), ("num_heads", opts.num_heads)):
            if value is not None:
                if key in kwargs and kwargs[key] != value:
                    raise ConfigError(f"model.{key}: {value} contradicts model.vision.kwargs.{key}={kwargs[key]}")
                kwargs[key] = value
        for key in ("pos_drop_rate", "proj_drop_rate", "attn_drop_rate"):
            kwargs.setdefault(key, opts.drop)
        self.transformer = build_vision_encoder(dataclasses.replace(opts.vision, kwargs=kwargs), opts.image_size)
        if not hasattr(self.transformer, "blocks") or getattr(self.transformer, "cls_token", None) is None:
            raise ConfigError(f"model.vision.name: {opts.vision.name} is not a ViT with a class token")
        width = int(self.transformer.embed_dim)
        self.hidden_size = width

        self.tokenizer = build_tokenizer(opts.text.name)
        self.text_embeddings = self._build_text_embeddings(width)
        self.type_embeddings = nn.Embedding(3, width)  # 0 text, 1 image, 2 second image (NLVR2)
        self.pooler = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.itm_head = nn.Linear(width, 2)
        vocab = self.text_embeddings.word_embeddings.num_embeddings
        self.mlm_head = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=1e-12), nn.Linear(width, vocab)
        )
        for module in (self.type_embeddings, self.pooler, self.itm_head, self.mlm_head):
            module.apply(_init_bert)

    def _build_text_embeddings(self, width: int) -> nn.Module:
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertEmbeddings

        opts = self.opts
        cfg = BertConfig(
            vocab_size=len(self.tokenizer),
            hidden_size=width,
            max_position_embeddings=opts.max_text_len,
            type_vocab_size=2,
            hidden_dropout_prob=opts.drop,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        emb = BertEmbeddings(cfg)
        emb.apply(_init_bert)
        if opts.text.pretrained:
            src_cfg = text_config(opts.text)
            if src_cfg.hidden_size != width:
                raise ConfigError(
                    f"model.text.pretrained: {opts.text.name} has hidden size {src_cfg.hidden_size} but the "
                    f"transformer is {width} wide; use a ViT of that width or set model.text.pretrained=false"
                )
            if src_cfg.max_position_embeddings < opts.max_text_len:
                raise ConfigError(
                    f"model.max_text_len: {opts.max_text_len} exceeds the {src_cfg.max_position_embeddings} positions "
                    f"of {opts.text.name}"
                )
            if src_cfg.vocab_size != cfg.vocab_size:
                raise ConfigError(f"model.text.name: vocabulary {src_cfg.vocab_size} != tokenizer's {cfg.vocab_size}")
            src = build_text_encoder(opts.text).embeddings
            with torch.no_grad():
                emb.word_embeddings.weight.copy_(src.word_embeddings.weight)
                emb.position_embeddings.weight.copy_(src.position_embeddings.weight[: opts.max_text_len])
                emb.token_type_embeddings.weight.copy_(src.token_type_embeddings.weight[:2])
                emb.LayerNorm.load_state_dict(src.LayerNorm.state_dict())
        return emb

    # -- inputs ---------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.itm_head.weight.device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids, attention mask, word ids (``-1`` on specials/padding) and a per-row ``truncated`` flag.

        Captions longer than ``max_text_len`` tokens (often MixGen concatenations) are cut to ``max_text_len``
        with the final [SEP] kept.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not a single string")
        limit = self.opts.max_text_len
        # one token more than allowed: a row that reaches it was truncated by the tokenizer
        enc = self.tokenizer(list(texts), truncation=True, max_length=limit + 1)
        sep = self.tokenizer.sep_token_id
        pad = self.tokenizer.pad_token_id
        rows, words, truncated = [], [], []
        for i, ids in enumerate(enc["input_ids"]):
            wids = [-1 if w is None else w for w in enc.word_ids(i)]
            cut = len(ids) > limit
            if cut:
                ids, wids = ids[: limit - 1] + [sep], wids[: limit - 1] + [-1]
            if not self.opts.whole_word_masking:
                wids = [p if w >= 0 else -1 for p, w in enumerate(wids)]
            rows.append(ids)
            words.append(wids)
            truncated.append(cut)
        length = max(len(r) for r in rows) if rows else 0
        input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
        word_ids = torch.full((len(rows), length), -1, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (ids, wids) in enumerate(zip(rows, words)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            word_ids[i, : len(ids)] = torch.tensor(wids)
            mask[i, : len(ids)] = 1
        dev = self.device
        return {
            "input_ids": input_ids.to(dev),
            "attention_mask": mask.to(dev),
            "word_ids": word_ids.to(dev),
            "truncated": torch.tensor(truncated, dtype=torch.bool),
        }

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image tokens before fusion: patch embeddings with class token and position embedding ``[B, 1+N, D]``."""
        vit = self.transformer
        x = vit.patch_embed(images.to(self.itm_head.weight.dtype))
        x = vit._pos_embed(x)  # class token + (interpolation-free) position embedding, timm's own code path
        return vit.norm_pre(x)

    def encode_text(self, text_tokens: dict[str, torch.Tensor] | Sequence[str]) -> torch.Tensor:
        """Text tokens before fusion: word + position embeddings ``[B, L, D]`` (accepts strings too)."""
        if not isinstance(text_tokens, dict):
            text_tokens = self.tokenize(text_tokens)
        return self.text_embeddings(input_ids=text_tokens["input_ids"])

    # -- fusion ---------------------------------------------------------------------------------------------------
    def _block(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor, need_attn: bool):
        if not need_attn:
            return block(x, attn_mask=bias), None
        # the same computation as timm's Block/Attention, unfused, to expose the attention probabilities
        attn_mod = block.attn
        h = block.norm1(x)
        bsz, n, _ = h.shape
        qkv = attn_mod.qkv(h).reshape(bsz, n, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
        probs = ((q * attn_mod.scale) @ k.transpose(-2, -1) + bias).softmax(dim=-1)
        out = (attn_mod.attn_drop(probs) @ v).transpose(1, 2).reshape(bsz, n, -1)
        out = attn_mod.norm(out)
        gate = getattr(attn_mod, "gate", None)
        if gate is not None:
            out = out * gate(h).sigmoid()
        out = attn_mod.proj_drop(attn_mod.proj(out))
        x = x + block.drop_path1(block.ls1(out))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return x, probs

    def _fuse_one(
        self, image: torch.Tensor, tokens: dict[str, torch.Tensor], image_type: int, output_attentions: bool
    ) -> dict[str, Any]:
        image_embeds = self.encode_image(image) if image.ndim == 4 else image
        text_embeds = self.encode_text(tokens)
        bsz, length = tokens["input_ids"].shape
        if image_embeds.shape[0] != bsz:
            raise ValueError(f"fuse: {image_embeds.shape[0]} images for {bsz} texts")
        dtype = image_embeds.dtype
        text_embeds = text_embeds.to(dtype) + self.type_embeddings.weight[0].to(dtype)
        image_embeds = image_embeds + self.type_embeddings.weight[image_type].to(dtype)
        x = torch.cat([text_embeds, image_embeds], dim=1)
        mask = torch.cat(
            [tokens["attention_mask"].bool(), torch.ones(image_embeds.shape[:2], dtype=torch.bool, device=x.device)],
            dim=1,
        )
        bias = torch.zeros(mask.shape, dtype=dtype, device=x.device)
        bias = bias.masked_fill(~mask, torch.finfo(dtype).min)[:, None, None, :]
        attentions = []
        for block in self.transformer.blocks:
            x, probs = self._block(block, x, bias, output_attentions)
            if probs is not None:
                attentions.append(probs)
        x = self.transformer.norm(x)
        out = {
            "pooled": self.pooler(x[:, 0]),
            "text_feats": x[:, :length],
            "image_feats": x[:, length:],
            "tokens": x,
            "mask": mask,
        }
        if output_attentions:
            out["attentions"] = attentions  # per layer [B, heads, L+1+N, L+1+N]; text first, then image
        return out

    def fuse(
        self,
        image_embeds_or_images: torch.Tensor | Sequence[torch.Tensor],
        text_tokens: dict[str, torch.Tensor] | Sequence[str],
        *,
        output_attentions: bool = False,
    ) -> dict[str, Any]:
        """Joint encoding of texts with one image each, or two (NLVR2: a list/tuple of two).

        An image argument is a batch of images ``[B,3,H,W]`` or of :meth:`encode_image` outputs ``[B,1+N,D]``.
        One image: ``pooled`` ``[B, D]``, ``text_feats``, ``image_feats``, ``tokens``, ``mask`` and, on request,
        ``attentions``. Two images: ViLT's NLVR2 scheme, one pass per image with image type 1 and 2; ``pooled`` is
        their concatenation ``[B, 2D]`` and ``per_image`` holds the two single-image outputs.
        """
        tokens = text_tokens if isinstance(text_tokens, dict) else self.tokenize(text_tokens)
        if isinstance(image_embeds_or_images, torch.Tensor):
            return self._fuse_one(image_embeds_or_images, tokens, 1, output_attentions)
        images = list(image_embeds_or_images)
        if len(images) == 1:
            return self._fuse_one(images[0], tokens, 1, output_attentions)
        if len(images) != 2:
            raise ValueError(f"fuse: one or two images per text, got {len(images)}")
        outs = [self._fuse_one(img, tokens, t, output_attentions) for img, t in zip(images, (1, 2))]
        return {"pooled": torch.cat([o["pooled"] for o in outs], dim=-1), "per_image": outs}

    @torch.no_grad()
    def init_second_image_type(self) -> None:
        """Start type embedding 2 (NLVR2's second image) from type 1, as ViLT does when it adds the row."""
        self.type_embeddings.weight[2].copy_(self.type_embeddings.weight[1])

    # -- pretraining ----------------------------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        opts = self.opts
        images = batch["image"].to(self.device)
        tokens = self.tokenize(batch["text"])
        bsz = images.shape[0]
        losses: dict[str, torch.Tensor] = {}
        total = images.new_zeros((), dtype=torch.float32)

        # ITM (+ WPA) on unmasked text
        labels, image_index = itm_negatives(bsz)
        labels, image_index = labels.to(self.device), image_index.to(self.device)
        itm = self._fuse_one(images[image_index], tokens, 1, False)
        itm_logits = self.itm_head(itm["pooled"]).float()
        itm_loss = F.cross_entropy(itm_logits, labels)
        losses["itm"] = itm_loss
        total = total + opts.itm_weight * itm_loss
        if opts.wpa:
            specials = torch.tensor(self.tokenizer.all_special_ids, device=self.device)
            text_valid = tokens["attention_mask"].bool() & ~torch.isin(tokens["input_ids"], specials)
            dist = wpa_distance(
                itm["text_feats"], itm["image_feats"][:, 1:], text_valid, opts.wpa_beta, opts.wpa_iterations
            )
            losses["wpa"] = wpa_loss(dist, labels)
            total = total + opts.wpa_weight * losses["wpa"]

        # MLM on masked text with the matching images
        masked_ids, mlm_labels = mask_words(
            tokens["input_ids"],
            tokens["word_ids"],
            mask_token_id=self.tokenizer.mask_token_id,
            vocab_size=self.text_embeddings.word_embeddings.num_embeddings,
            probability=opts.mlm_probability,
        )
        mlm = self._fuse_one(images, {**tokens, "input_ids": masked_ids}, 1, False)
        picked = mlm_labels != IGNORE
        if picked.any():
            logits = self.mlm_head(mlm["text_feats"][picked]).float()
            mlm_loss = F.cross_entropy(logits, mlm_labels[picked])
        else:  # only empty captions: nothing to predict, keep the graph connected
            mlm_loss = mlm["text_feats"].sum() * 0.0
        losses["mlm"] = mlm_loss
        total = total + opts.mlm_weight * mlm_loss

        return {
            "loss": total,
            "losses": {k: v.detach() for k, v in losses.items()},
            "stats": {
                "text_truncated": tokens["truncated"].float().mean(),
                "itm_acc": (itm_logits.argmax(-1) == labels).float().mean().detach(),
            },
        }

    def no_weight_decay(self) -> set[str]:
        """Names exempt from weight decay besides 1-D parameters (ViLT: biases and norms only)."""
        names = set()
        inner = getattr(self.transformer, "no_weight_decay", None)
        if callable(inner):
            names |= {f"transformer.{n}" for n in inner()}
        return names


def _init_bert(module: nn.Module) -> None:
    """BERT's init (normal 0.02, zero bias, unit LayerNorm), which ViLT applies to its new modules."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.data.fill_(1.0)
        module.bias.data.zero_()


@register("vilt", ViltOptions)
def build(opts: ViltOptions) -> Vilt:
    return Vilt(opts)
