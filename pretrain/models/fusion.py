"""ALBEF-style BERT text encoder with cross-attention to image tokens in its upper layers.

Built from transformers' ``BertEmbeddings``/``BertLayer`` pieces (no fork of BERT): layers ``[0, fusion_layer)`` are
plain text layers, layers ``[fusion_layer, L)`` are ``BertLayer``s built with ``add_cross_attention=True`` whose
cross-attention key/value read image tokens of width ``encoder_width``. Parameter names follow ``BertModel``
(``embeddings.*``, ``encoder.layer.{i}.*``) so a pretrained text tower loads by name; the cross-attention weights
(absent from a text-only checkpoint) start from BERT's random initialisation.

Modes (as in ALBEF): ``text`` runs the text layers only (unimodal text encoder), ``fusion`` runs the fusion layers on
given text hidden states, ``multimodal`` runs everything from token ids.

Two images per text (NLVR2), ``pair_mode``:
  * ``alternate`` (ALBEF's rule): fusion layer ``i`` cross-attends to image set ``(i - fusion_layer) % n``;
  * ``concat``: every fusion layer cross-attends to the concatenation of all image token sets.

NLVR2's paired encoder (ALBEF's ``model_nlvr``): :func:`pair_fusion_layers` duplicates every fusion layer in place,
one copy per image (with ``alternate`` routing, copy 0 of pair ``j`` sees the left image and copy 1 the right one),
and ties the two copies' cross-attention key/value projections (one ``Parameter``, two uses); queries,
self-attention and the feed-forward stay separate. :func:`is_paired_state` recognises such weights in a file.

Grad-CAM: ``set_save_attention(True)`` makes every fusion layer store its cross-attention probabilities
(``attention_maps[i]``, shape ``[B, heads, L_text, N_image]``) and, when they require grad, register a hook that
stores their gradient (``attention_grads[i]``). Storing switches cross-attention to the eager kernel (SDPA does not
return probabilities).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

Mode = Literal["text", "fusion", "multimodal"]
PairMode = Literal["alternate", "concat"]


def extended_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, L]`` 1/0 keep-mask -> additive ``[B, 1, 1, L]`` mask (0 keep, dtype-min drop), bidirectional."""
    mask = mask[:, None, None, :].to(dtype)
    return (1.0 - mask) * torch.finfo(dtype).min


def bert_init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation (normal(0, std), padding row 0, LayerNorm 1/0); pretrained weights load over it."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class FusionBert(nn.Module):
    """BERT whose layers from ``fusion_layer`` on cross-attend to image tokens (ALBEF's text/fusion encoder)."""

    def __init__(self, config: BertConfig, fusion_layer: int, encoder_width: int, text_pool: str = "cls") -> None:
        super().__init__()
        num_layers = config.num_hidden_layers
        if not 0 <= fusion_layer <= num_layers:
            raise ValueError(f"fusion_layer={fusion_layer}: must be in [0, num_hidden_layers={num_layers}]")
        if text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be cls or mean, got {text_pool!r}")
        # "mean": the text layers' [CLS] output is replaced by the masked mean of the tokens before anyone reads it
        # (the contrastive feature, and the fusion layers' [CLS] input). Sentence-transformers towers such as
        # minilm were trained with mean pooling and their intermediate [CLS] carries no sentence: its cosine
        # across different captions is 1.000 after 2 and 4 of minilm's layers (docs/models.md)
        self.text_pool = text_pool
        self.config = config
        self.fusion_layer = fusion_layer
        self.encoder_width = encoder_width
        text_cfg = copy.deepcopy(config)
        text_cfg.is_decoder = False
        text_cfg.add_cross_attention = False
        text_cfg._attn_implementation = "sdpa"
        # BertLayer only builds cross-attention for decoder configs; causality is undone below (bidirectional mask,
        # is_causal=False), so "decoder" only means "has cross-attention" here.
        fusion_cfg = copy.deepcopy(text_cfg)
        fusion_cfg.is_decoder = True
        fusion_cfg.add_cross_attention = True
        # a config of its own so Grad-CAM can switch only the cross-attention to the eager kernel
        self._cross_cfg = copy.deepcopy(fusion_cfg)
        self.embeddings = BertEmbeddings(text_cfg)
        self.encoder = nn.Module()
        layers = []
        for i in range(num_layers):
            if i < fusion_layer:
                layers.append(BertLayer(text_cfg, layer_idx=i))
                continue
            layer = BertLayer(fusion_cfg, layer_idx=i)
            layer.attention.self.is_causal = False
            cross = layer.crossattention.self
            cross.config = self._cross_cfg
            # image tokens may be narrower/wider than the text (ALBEF's encoder_width)
            cross.key = nn.Linear(encoder_width, cross.all_head_size)
            cross.value = nn.Linear(encoder_width, cross.all_head_size)
            layers.append(layer)
        self.encoder.layer = nn.ModuleList(layers)
        self.apply(self._init_weights)

        self._save_attention = False
        self.attention_maps: dict[int, torch.Tensor] = {}
        self.attention_grads: dict[int, torch.Tensor] = {}
        self.paired = False
        self._hook_handles: list = []
        self._hook_fusion_layers()

    def _hook_fusion_layers(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for i in range(self.fusion_layer, len(self.encoder.layer)):
            cross = self.encoder.layer[i].crossattention.self
            cross.fusion_index = i
            self._hook_handles.append(cross.register_forward_hook(self._store_attention))

    # ------------------------------------------------------------------ weights
    def _init_weights(self, module: nn.Module) -> None:
        bert_init_weights(module, self.config.initializer_range)

    def load_text_weights(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Load a ``BertModel`` state dict; returns the keys left at random init (the cross-attention ones).

        Raises when a non-cross-attention weight is missing or a shape differs: a silent partial load would train
        a randomly initialised tower while claiming a pretrained one.
        """
        state = {k.removeprefix("bert."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(("pooler.", "cls."))}
        missing, unexpected = self.load_state_dict(state, strict=False)
        bad_missing = [k for k in missing if ".crossattention." not in k]
        if bad_missing or unexpected:
            raise RuntimeError(
                f"text weights do not match the fusion encoder: missing {bad_missing[:5]}, unexpected {unexpected[:5]}"
            )
        return list(missing)

    # ------------------------------------------------------------------ Grad-CAM
    def set_save_attention(self, enabled: bool = True) -> None:
        """Store cross-attention probabilities (and their gradients) of every fusion layer on each forward."""
        self._save_attention = enabled
        self._cross_cfg._attn_implementation = "eager" if enabled else "sdpa"
        self.attention_maps.clear()
        self.attention_grads.clear()

    def _store_attention(self, module: nn.Module, _inputs: tuple, output: tuple) -> None:
        # a bound method (not a closure) so that a deep copy (the momentum twin) hooks into its own copy
        if not self._save_attention:
            return
        index = module.fusion_index
        probs = output[1]
        if probs is None:
            raise RuntimeError("cross-attention probabilities unavailable: the kernel is not eager")
        self.attention_maps[index] = probs
        if probs.requires_grad:
            probs.register_hook(functools.partial(self._store_gradient, index))

    def _store_gradient(self, index: int, grad: torch.Tensor) -> None:
        self.attention_grads[index] = grad

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        hidden_states: torch.Tensor | None = None,
        image_embeds: torch.Tensor | Sequence[torch.Tensor] | None = None,
        image_atts: torch.Tensor | Sequence[torch.Tensor] | None = None,
        mode: Mode = "multimodal",
        pair_mode: PairMode = "alternate",
    ) -> torch.Tensor:
        """Last hidden states ``[B, L, H]``.

        ``text``/``multimodal`` start from ``input_ids``; ``fusion`` starts from ``hidden_states`` (the output of
        ``text`` mode). ``image_embeds`` is one ``[B, N, D]`` tensor or a sequence of them (several images per
        text); ``image_atts`` their 1/0 masks (default: all tokens valid).
        """
        if mode == "fusion":
            if hidden_states is None:
                raise ValueError("mode='fusion' needs hidden_states (text-mode output)")
            start, stop = self.fusion_layer, len(self.encoder.layer)
        elif mode in ("text", "multimodal"):
            if input_ids is None:
                raise ValueError(f"mode={mode!r} needs input_ids")
            hidden_states = self.embeddings(input_ids=input_ids)
            start, stop = 0, (self.fusion_layer if mode == "text" else len(self.encoder.layer))
        else:
            raise ValueError(f"mode must be text, fusion or multimodal, got {mode!r}")
        if attention_mask is None:
            attention_mask = torch.ones(hidden_states.shape[:2], dtype=torch.long, device=hidden_states.device)
        dtype = hidden_states.dtype
        self_mask = extended_mask(attention_mask, dtype)

        images: list[torch.Tensor] = []
        image_masks: list[torch.Tensor] = []
        if stop > self.fusion_layer and mode != "text":
            if image_embeds is None:
                raise ValueError(f"mode={mode!r} needs image_embeds")
            images, image_masks = self._image_sets(image_embeds, image_atts, dtype, pair_mode)

        for i in range(start, stop):
            if i == self.fusion_layer and mode == "multimodal":
                hidden_states = self.summarise(hidden_states, attention_mask)
            layer = self.encoder.layer[i]
            if i < self.fusion_layer:
                hidden_states = layer(hidden_states, self_mask)
            else:
                k = (i - self.fusion_layer) % len(images)
                hidden_states = layer(
                    hidden_states, self_mask, encoder_hidden_states=images[k], encoder_attention_mask=image_masks[k]
                )
        if mode == "text":
            hidden_states = self.summarise(hidden_states, attention_mask)
        return hidden_states

    def summarise(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text layers' output with position 0 set by ``text_pool`` (unchanged for ``cls``)."""
        if self.text_pool == "cls":
            return hidden_states
        weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
        mean = (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return torch.cat([mean.unsqueeze(1), hidden_states[:, 1:]], dim=1)

    def _image_sets(
        self,
        image_embeds: torch.Tensor | Sequence[torch.Tensor],
        image_atts: torch.Tensor | Sequence[torch.Tensor] | None,
        dtype: torch.dtype,
        pair_mode: PairMode,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        images = [image_embeds] if isinstance(image_embeds, torch.Tensor) else list(image_embeds)
        if not images:
            raise ValueError("image_embeds: empty sequence")
        if image_atts is None:
            masks = [torch.ones(x.shape[:2], dtype=torch.long, device=x.device) for x in images]
        else:
            masks = [image_atts] if isinstance(image_atts, torch.Tensor) else list(image_atts)
            if len(masks) != len(images):
                raise ValueError(f"image_atts: {len(masks)} masks for {len(images)} image token sets")
        images = [x.to(dtype) for x in images]
        if pair_mode == "concat" and len(images) > 1:
            images, masks = [torch.cat(images, dim=1)], [torch.cat(masks, dim=1)]
        elif pair_mode not in ("alternate", "concat"):
            raise ValueError(f"pair_mode must be alternate or concat, got {pair_mode!r}")
        return images, [extended_mask(m, dtype) for m in masks]


def pair_fusion_layers(bert: FusionBert) -> FusionBert:
    """Turn ``bert`` into ALBEF's NLVR2 encoder, in place: every fusion layer becomes two layers.

    Pretrained fusion layer ``f + j`` is copied to layers ``f + 2j`` and ``f + 2j + 1`` (weights copied exactly);
    in each pair the cross-attention ``key`` and ``value`` modules of the second copy are replaced by the first's,
    so they are one parameter used twice. With ``pair_mode="alternate"`` and two images, layer ``f + 2j`` attends
    to the first image and ``f + 2j + 1`` to the second (ALBEF's ``(layer - f) % 2`` rule). Text layers are kept.
    Returns ``bert``; a second call raises (the layout would double again).
    """
    if bert.paired:
        raise ValueError("pair_fusion_layers: the encoder is already paired")
    old = list(bert.encoder.layer)
    layers: list[nn.Module] = old[: bert.fusion_layer]
    for index, layer in enumerate(old[bert.fusion_layer :]):
        # forward hooks are per module and would be deep-copied with a reference to ``bert``: drop, re-register
        layer.crossattention.self._forward_hooks.clear()
        twin = copy.deepcopy(layer)
        twin.crossattention.self.config = bert._cross_cfg  # one switch (eager for Grad-CAM) for every layer
        twin.crossattention.self.key = layer.crossattention.self.key
        twin.crossattention.self.value = layer.crossattention.self.value
        for k, mod in enumerate((layer, twin)):
            new_idx = bert.fusion_layer + 2 * index + k
            mod.layer_idx = new_idx
            for sub in mod.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = new_idx
        layers += [layer, twin]
    bert.encoder.layer = nn.ModuleList(layers)
    bert.config.num_hidden_layers = len(layers)
    bert.paired = True
    bert._hook_fusion_layers()
    bert.attention_maps.clear()
    bert.attention_grads.clear()
    return bert


def is_paired_state(state: Mapping[str, torch.Tensor], prefix: str, num_layers: int) -> bool:
    """Whether ``state`` holds a paired encoder under ``prefix`` (a layer index beyond the unpaired ``num_layers``)."""
    head = f"{prefix}encoder.layer.{num_layers}."
    return any(k.startswith(head) for k in state)
