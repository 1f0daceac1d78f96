"""Import of the public style-augmentation checkpoints (philipjackson/style-augmentation, MIT).

The three files are legacy (pre-1.6, non-zip) torch pickles:

* ``checkpoint_transformer.pth``: ``{"state_dict_ghiasi": state_dict}``; the reference names its layers
  ``layers.0-2`` (``ConvInRelu``: ``conv.weight/bias``), ``layers.3-7`` (``ResidualBlock``: ``conv1``, ``conv2``,
  ``fc_gamma1``, ``fc_beta1``, ``fc_gamma2``, ``fc_beta2``, each ``.weight/.bias``) and ``layers.8-10``
  (``UpsampleConvInRelu``: ``conv``, ``fc_gamma``, ``fc_beta``). Its instance norms have no parameters.
* ``checkpoint_stylepredictor.pth``: ``{"state_dict_stylepredictor": state_dict}`` with torchvision Inception-v3
  names (``Conv2d_1a_3x3.conv.weight``, ``Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}``, ...,
  ``Mixed_6e.branch_pool.bn.running_var``) and ``fc.weight/bias`` (768 -> 100). timm uses the same trunk names.
* ``checkpoint_embeddings.pth``: ``pbn_embedding_mean`` (100,), ``pbn_embedding_covariance`` (100, 100),
  ``imagenet_embedding_mean`` (100,).

Loading is ``torch.load(weights_only=True)`` first (PyTorch's restricted unpickler also reads the legacy format);
only if that refuses the file *and* the caller passed ``allow_unsafe_pickle=True`` is it unpickled in full, which
executes code from the file. Key mapping is strict: a reference key with no place in our modules, or one of our
parameters that the file does not fill, is an error listing them, never a silent partial load (the public code's
``strict=False`` hid such problems). BatchNorm ``num_batches_tracked`` counters are the one exception: files saved
before PyTorch 0.4.1 do not have them and they do not affect inference, so a missing one keeps its initial value.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .network import STYLE_DIM, StylePredictor, StyleTransformer

TRANSFORMER_KEY = "state_dict_ghiasi"
PREDICTOR_KEY = "state_dict_stylepredictor"
EMBEDDING_KEYS = ("pbn_embedding_mean", "pbn_embedding_covariance", "imagenet_embedding_mean")


class CheckpointKeyError(ValueError):
    """A state dict whose keys or shapes do not match the target module."""


def map_transformer_key(key: str) -> str | None:
    """Reference ``Ghiasi`` key -> :class:`StyleTransformer` key (``None`` when it has no counterpart)."""
    m = re.fullmatch(r"layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if not m:
        return None
    layer, name, param = int(m.group(1)), m.group(2), m.group(3)
    if layer <= 2 and name == "conv":
        return f"down.{layer}.conv.{param}"
    if 3 <= layer <= 7:
        block = layer - 3
        c = re.fullmatch(r"conv([12])", name)
        if c:
            return f"res.{block}.conv{c.group(1)}.conv.{param}"
        f = re.fullmatch(r"fc_(gamma|beta)([12])", name)
        if f:
            return f"res.{block}.norm{f.group(2)}.{f.group(1)}.{param}"
        return None
    if layer in (8, 9, 10):
        prefix_conv, prefix_norm = (
            (f"up.{layer - 8}.conv.conv", f"up.{layer - 8}.norm") if layer < 10 else ("out_conv.conv", "out_norm")
        )
        if name == "conv":
            return f"{prefix_conv}.{param}"
        f = re.fullmatch(r"fc_(gamma|beta)", name)
        if f:
            return f"{prefix_norm}.{f.group(1)}.{param}"
    return None


def map_predictor_key(key: str) -> str | None:
    """Reference ``StylePredictor`` key -> :class:`StylePredictor` key (``None`` when it has no counterpart)."""
    if re.fullmatch(r"fc\.(weight|bias)", key):
        return key
    if re.fullmatch(r"(Conv2d_\w+|Mixed_(5[bcd]|6[abcde]))\..+", key):
        return f"backbone.{key}"
    return None


def _strip_module_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Drop a ``module.`` prefix that DataParallel adds to every key."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def convert_state_dict(
    ref_sd: Mapping[str, torch.Tensor], module: nn.Module, key_map: Callable[[str], str | None], what: str
) -> dict[str, torch.Tensor]:
    """Rename ``ref_sd`` onto ``module``'s keys; raises :class:`CheckpointKeyError` on any mismatch."""
    ref_sd = _strip_module_prefix(ref_sd)
    ours = module.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in ref_sd.items():
        target = key_map(key)
        if target is None or target not in ours:
            unexpected.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key}: not a tensor ({type(value).__name__})")
            continue
        if tuple(value.shape) != tuple(ours[target].shape):
            mismatched.append(f"{key} -> {target}: shape {tuple(value.shape)} vs {tuple(ours[target].shape)}")
            continue
        out[target] = value.detach().to(ours[target].dtype)
    missing = [k for k in ours if k not in out and not k.endswith("num_batches_tracked")]
    if unexpected or missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if mismatched:
            parts.append(f"shape mismatches: {mismatched[:8]}")
        raise CheckpointKeyError(f"{what}: state dict does not match ({'; '.join(parts)})")
    for k in ours:
        if k not in out:  # only num_batches_tracked can get here
            out[k] = ours[k]
    return out


def load_transformer_state(ref_sd: Mapping[str, torch.Tensor], transformer: StyleTransformer) -> None:
    """Load a reference ``Ghiasi`` state dict into ``transformer`` (strict)."""
    transformer.load_state_dict(convert_state_dict(ref_sd, transformer, map_transformer_key, "transformer"))


def load_predictor_state(ref_sd: Mapping[str, torch.Tensor], predictor: StylePredictor) -> None:
    """Load a reference ``StylePredictor`` state dict into ``predictor`` (strict)."""
    predictor.load_state_dict(convert_state_dict(ref_sd, predictor, map_predictor_key, "style predictor"))


def load_legacy(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> Any:
    """``torch.load`` a (possibly legacy-format) file safely; full unpickling only with ``allow_unsafe_pickle``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as exc:
        if not allow_unsafe_pickle:
            raise ValueError(
                f"{p}: the safe loader (weights_only=True) refused this file ({str(exc).splitlines()[0][:200]}). "
                "Loading it in full executes code from the file; only for a file you trust, pass "
                "allow_unsafe_pickle=True (config: model.allow_unsafe_pickle=true)"
            ) from exc
    return torch.load(p, map_location="cpu", weights_only=False)


def _entry(obj: Any, key: str, path: str | os.PathLike) -> Any:
    if not isinstance(obj, Mapping) or key not in obj:
        have = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointKeyError(f"{path}: expected key {key!r}, found {have}")
    return obj[key]


@dataclasses.dataclass
class EmbeddingStats:
    """The style-embedding Gaussian (PBN mean and covariance) and the base embedding used without a predictor."""

    mean: torch.Tensor  # [100] float64
    cov: torch.Tensor  # [100, 100] float64, symmetric PSD
    base: torch.Tensor  # [100] float64 (ImageNet mean embedding)


def check_stats(mean: torch.Tensor, cov: torch.Tensor, base: torch.Tensor | None, where: str) -> EmbeddingStats:
    """Validate shapes, finiteness, symmetry and positive semi-definiteness; returns float64 copies."""
    mean = torch.as_tensor(mean).detach().to(torch.float64).flatten()
    cov = torch.as_tensor(cov).detach().to(torch.float64)
    base = mean.clone() if base is None else torch.as_tensor(base).detach().to(torch.float64).flatten()
    d = mean.numel()
    if d != STYLE_DIM or cov.shape != (d, d) or base.numel() != d:
        raise ValueError(
            f"{where}: expected mean ({STYLE_DIM},), covariance ({STYLE_DIM},{STYLE_DIM}), base ({STYLE_DIM},); got "
            f"{tuple(mean.shape)}, {tuple(cov.shape)}, {tuple(base.shape)}"
        )
    if not (torch.isfinite(mean).all() and torch.isfinite(cov).all() and torch.isfinite(base).all()):
        raise ValueError(f"{where}: non-finite values in the embedding statistics")
    scale = max(cov.abs().max().item(), 1e-12)
    if (cov - cov.T).abs().max().item() > 1e-6 * scale:
        raise ValueError(f"{where}: covariance is not symmetric")
    if torch.linalg.eigvalsh((cov + cov.T) / 2).min().item() < -1e-6 * scale:
        raise ValueError(f"{where}: covariance is not positive semi-definite")
    return EmbeddingStats(mean, cov, base)


def load_embedding_stats(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> EmbeddingStats:
    """Read ``checkpoint_embeddings.pth`` (PBN mean/covariance, ImageNet mean embedding)."""
    obj = load_legacy(path, allow_unsafe_pickle)
    mean, cov, base = (_entry(obj, k, path) for k in EMBEDDING_KEYS)
    return check_stats(mean, cov, base, str(path))


def load_public_transformer(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> StyleTransformer:
    """A :class:`StyleTransformer` with the weights of ``checkpoint_transformer.pth``."""
    net = StyleTransformer()
    load_transformer_state(_entry(load_legacy(path, allow_unsafe_pickle), TRANSFORMER_KEY, path), net)
    return net.eval()


def load_public_predictor(path: str | os.PathLike, allow_unsafe_pickle: bool = False) -> StylePredictor:
    """A :class:`StylePredictor` with the weights of ``checkpoint_stylepredictor.pth``."""
    net = StylePredictor()
    load_predictor_state(_entry(load_legacy(path, allow_unsafe_pickle), PREDICTOR_KEY, path), net)
    return net.eval()


def export_style_checkpoint(
    out: str | os.PathLike,
    transformer_path: str | os.PathLike,
    embeddings_path: str | os.PathLike,
    predictor_path: str | os.PathLike | None = None,
    allow_unsafe_pickle: bool = False,
) -> None:
    """Convert the public files into one checkpoint of our format (:func:`save_style_checkpoint`), loadable safely.

    The ImageNet mean embedding becomes the base embedding used without a predictor.
    """
    from .network import save_style_checkpoint

    stats = load_embedding_stats(embeddings_path, allow_unsafe_pickle)
    transformer = load_public_transformer(transformer_path, allow_unsafe_pickle)
    predictor = load_public_predictor(predictor_path, allow_unsafe_pickle) if predictor_path else None
    meta = {"source": "philipjackson/style-augmentation", "transformer": os.path.basename(transformer_path)}
    save_style_checkpoint(out, transformer, predictor, stats.mean, stats.cov, base_embedding=stats.base, meta=meta)


__all__ = [
    "CheckpointKeyError",
    "EmbeddingStats",
    "check_stats",
    "convert_state_dict",
    "export_style_checkpoint",
    "load_embedding_stats",
    "load_legacy",
    "load_predictor_state",
    "load_public_predictor",
    "load_public_transformer",
    "load_transformer_state",
    "map_predictor_key",
    "map_transformer_key",
]
