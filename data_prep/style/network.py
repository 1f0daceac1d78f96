"""The style-randomization networks (Ghiasi et al. 2017, as used by Jackson et al.'s style augmentation).

* :class:`StyleTransformer`: reflection-padded conv encoder (9x9 3->32, 3x3/2 32->64, 3x3/2 64->128, each
  instance-normalised + ReLU, *not* style-conditioned), five residual blocks at 128 channels and two
  nearest-upsample + 3x3 conv stages, then a 9x9 32->3 conv, all with *conditional* instance norm whose per-channel
  scale/shift come from the 100-d style embedding through one ``nn.Linear`` each; a sigmoid maps to [0, 1].
  ``forward(content, z)`` takes [0, 1] RGB of any size >= 8 px (padded to a multiple of 4, cropped back).
* :class:`StylePredictor`: timm's Inception-v3 truncated after ``Mixed_6e``, spatial mean, ``Linear(768, 100)``.
  ``forward(style_image)`` takes [0, 1] RGB and applies the *correct* ImageNet -> Inception preprocessing (the
  public code divides blue by 0.255; we do not copy that typo).

Both are plain ``nn.Module`` s so a trainer can import them; :func:`save_style_checkpoint` /
:func:`load_style_checkpoint` define the project's own weight file (transformer + predictor + embedding statistics).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

STYLE_DIM = 100
IN_EPS = 1e-5
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inception-v3 trunk modules kept by the predictor (timm / torchvision names, also the public checkpoint's names).
INCEPTION_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "Pool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "Pool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
)
TRANSFORMER_MIN_SIZE = 8  # 9x9 reflection pad needs > 4 px; the 1/4-scale reflection pad needs >= 2 px


def instance_norm_act(
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
    eps: float = IN_EPS,
) -> torch.Tensor:
    """Instance norm (biased variance, like ``nn.InstanceNorm2d``) with optional per-sample affine and ReLU.

    The normalisation and the affine are folded into one ``x * a + b`` pass (a = scale/sigma, b = shift - mean*a),
    which saves two full passes over the activations compared with norm, multiply, add.
    """
    # Moments in fp32 even under bf16 autocast. One-pass E[x], E[x^2] instead of Welford ``var_mean``: on CPU it is
    # 4-8x faster. Its cancellation error grows with (|mean|/std)^2; conv outputs here have |mean|/std of order 1
    # (the test bounds the error at |mean|/std = 40).
    xf = x if x.dtype == torch.float32 else x.float()
    mean = xf.mean(dim=(2, 3), keepdim=True)
    var = (xf * xf).mean(dim=(2, 3), keepdim=True).sub_(mean * mean).clamp_min_(0.0)
    a = torch.rsqrt(var + eps)
    if scale is not None:
        a = a * scale.float()[:, :, None, None]
    b = -mean * a
    if shift is not None:
        b = b + shift.float()[:, :, None, None]
    y = torch.addcmul(b.to(x.dtype), x, a.to(x.dtype))
    return torch.relu_(y) if relu else y


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class ReflectConv(nn.Module):
    """Reflection padding of k//2 followed by an unpadded conv (with bias).

    A large kernel with very few output channels (the final 9x9 32->3) runs at a fraction of peak in oneDNN; it is
    computed instead as a 1xk conv to k*C_out channels (one per kernel row) plus k shifted row sums: the same
    multiply-adds, about 3x faster on CPU.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1) -> None:
        super().__init__()
        self.pad = kernel // 2
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=0)
        self.row_split = c_out <= 4 and kernel > 3 and stride == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4, mode="reflect")
        if not self.row_split:
            return self.conv(x)
        w, bias = self.conv.weight, self.conv.bias
        c_out, c_in, k, _ = w.shape
        rows = F.conv2d(x, w.permute(0, 2, 1, 3).reshape(c_out * k, c_in, 1, k))  # channel (o, ky)
        rows = rows.unflatten(1, (c_out, k))
        h = x.shape[-2] - k + 1
        out = rows[:, :, 0, 0:h] + bias.to(rows.dtype)[None, :, None, None]
        for ky in range(1, k):
            out = out + rows[:, :, ky, ky : ky + h]
        return out


class CondInstanceNorm(nn.Module):
    """Conditional instance norm: gamma = W_g z + b_g, beta = W_b z + b_b (no nonlinearity), per layer."""

    def __init__(self, channels: int, style_dim: int = STYLE_DIM) -> None:
        super().__init__()
        self.gamma = nn.Linear(style_dim, channels)
        self.beta = nn.Linear(style_dim, channels)

    def forward(self, x: torch.Tensor, z: torch.Tensor, relu: bool = False) -> torch.Tensor:
        return instance_norm_act(x, self.gamma(z), self.beta(z), relu=relu)


class ResidualBlock(nn.Module):
    """conv -> CIN -> ReLU -> conv -> CIN, added to the input (no ReLU after the sum)."""

    def __init__(self, channels: int = 128, style_dim: int = STYLE_DIM) -> None:
        super().__init__()
        self.conv1 = ReflectConv(channels, channels, 3)
        self.norm1 = CondInstanceNorm(channels, style_dim)
        self.conv2 = ReflectConv(channels, channels, 3)
        self.norm2 = CondInstanceNorm(channels, style_dim)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.norm1(self.conv1(x), z, relu=True)
        return x + self.norm2(self.conv2(y), z)


class UpsampleBlock(nn.Module):
    """Nearest x2 upsample, reflection-padded 3x3 conv, CIN, ReLU.

    Computed without materialising the upsampled map: a 3x3 conv over the nearest-x2, reflection-padded map equals,
    per output phase (row parity a, column parity b), a 2x2 conv over the *edge-replicated* low-resolution input
    whose taps are sums of the 3x3 taps. One 2x2 conv with 4x the output channels then a pixel shuffle gives the
    same numbers with 16/36 of the multiply-adds (checked against the direct form in tests).
    """

    # For output parity a, the 2-tap kernel over low-res offsets (-1, 0) [a=0] or (0, +1) [a=1] sums these 3x3 rows.
    _PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))

    def __init__(self, c_in: int, c_out: int, style_dim: int = STYLE_DIM, subpixel: bool = True) -> None:
        super().__init__()
        self.conv = ReflectConv(c_in, c_out, 3)
        self.norm = CondInstanceNorm(c_out, style_dim)
        self.subpixel = subpixel

    def _phase_weight(self) -> torch.Tensor:
        w = self.conv.conv.weight  # [O, I, 3, 3]
        phases = []
        for a in range(2):
            rows = [w[:, :, list(t), :].sum(dim=2) for t in self._PHASE_TAPS[a]]  # 2 x [O, I, 3]
            wa = torch.stack(rows, dim=2)  # [O, I, 2, 3]
            for b in range(2):
                cols = [wa[:, :, :, list(t)].sum(dim=3) for t in self._PHASE_TAPS[b]]
                phases.append(torch.stack(cols, dim=3))  # [O, I, 2, 2]
        # Output channel order (o, a, b): upsample_conv unflattens it and scatters phase (a, b) to pixels (2i+a, 2j+b).
        return torch.stack(phases, dim=1).reshape(-1, w.shape[1], 2, 2)

    def upsample_conv(self, x: torch.Tensor) -> torch.Tensor:
        """conv3x3(reflect_pad(nearest_x2(x))), exactly."""
        if not self.subpixel:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        h, w = x.shape[-2:]
        bias = self.conv.conv.bias.repeat_interleave(4)
        o = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), self._phase_weight().to(x.dtype), bias.to(x.dtype))
        # o[..., j, k] for phase (a, b) holds output pixel (2(j-a)+a, 2(k-b)+b): phase a reads o rows a..a+h-1.
        n, c = o.shape[0], o.shape[1] // 4
        o = o.unflatten(1, (c, 2, 2))
        y = torch.empty(n, c, 2 * h, 2 * w, dtype=o.dtype, device=o.device, memory_format=_memory_format(x))
        yv = y.unflatten(2, (h, 2)).unflatten(4, (w, 2))  # splitting dims is always a view
        for a in range(2):
            for b in range(2):
                yv[:, :, :, a, :, b] = o[:, :, a, b, a : a + h, b : b + w]
        return y

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.norm(self.upsample_conv(x), z, relu=True)


class StyleTransformer(nn.Module):
    """Ghiasi et al.'s style transfer network: ``forward(content [B,3,H,W] in [0,1], z [B,100]) -> [B,3,H,W]``."""

    def __init__(self, style_dim: int = STYLE_DIM, subpixel_upsample: bool = True) -> None:
        super().__init__()
        self.style_dim = style_dim
        self.down = nn.ModuleList([ReflectConv(3, 32, 9), ReflectConv(32, 64, 3, 2), ReflectConv(64, 128, 3, 2)])
        self.res = nn.ModuleList([ResidualBlock(128, style_dim) for _ in range(5)])
        self.up = nn.ModuleList(
            [UpsampleBlock(128, 64, style_dim, subpixel_upsample), UpsampleBlock(64, 32, style_dim, subpixel_upsample)]
        )
        self.out_conv = ReflectConv(32, 3, 9)
        self.out_norm = CondInstanceNorm(3, style_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch default init, with gamma biased to 1 so a fresh network starts near plain instance norm."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.reset_parameters()
        for m in self.modules():
            if isinstance(m, CondInstanceNorm):
                with torch.no_grad():
                    m.gamma.bias.add_(1.0)

    def forward(self, content: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if content.dim() != 4 or content.shape[1] != 3:
            raise ValueError(f"content must be [B,3,H,W], got {tuple(content.shape)}")
        if z.shape != (content.shape[0], self.style_dim):
            raise ValueError(f"z must be [{content.shape[0]},{self.style_dim}], got {tuple(z.shape)}")
        h, w = content.shape[-2:]
        if min(h, w) < TRANSFORMER_MIN_SIZE:
            raise ValueError(f"StyleTransformer needs images of at least {TRANSFORMER_MIN_SIZE}px, got {h}x{w}")
        ph, pw = (-h) % 4, (-w) % 4
        x = F.pad(content, (0, pw, 0, ph), mode="reflect") if (ph or pw) else content
        z = z.to(torch.float32)
        for conv in self.down:
            x = instance_norm_act(conv(x), relu=True)
        for block in self.res:
            x = block(x, z)
        for block in self.up:
            x = block(x, z)
        x = self.out_norm(self.out_conv(x), z)
        return torch.sigmoid(x[..., :h, :w])


def inception_preprocess(image: torch.Tensor) -> torch.Tensor:
    """[0,1] RGB -> ImageNet normalisation -> Google's [-1, 1] Inception input (overall exactly ``2x - 1``).

    Written as the two documented steps with the standard constants so they can be checked (blue std 0.225).
    """
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    x = (image - mean) / std
    return x * (std / 0.5) + (mean - 0.5) / 0.5


def predictor_feature_size(size: int) -> int:
    """Side of the Mixed_6e map for an input side ``size`` (0 or less: the input is too small)."""

    def conv(n: int, k: int, s: int = 1, p: int = 0) -> int:
        return (n + 2 * p - k) // s + 1

    n = conv(size, 3, 2)  # 1a
    n = conv(n, 3)  # 2a
    n = conv(n, 3, 2)  # pool1 (2b keeps size)
    n = conv(n, 3)  # 4a (3b is 1x1)
    n = conv(n, 3, 2)  # pool2
    return conv(n, 3, 2) if n >= 3 else 0  # Mixed_6a


PREDICTOR_MIN_SIZE = next(s for s in range(1, 512) if predictor_feature_size(s) >= 1)


PREDICTOR_BACKBONES = ("inception_v3", "efficientnet_lite0")
EFFICIENTNET_MIN_SIZE = 32  # five stride-2 stages: a 1x1 map at 32 px


class StylePredictor(nn.Module):
    """Style image ([0,1] RGB) -> 100-d style embedding: a CNN trunk, spatial mean, one ``nn.Linear``.

    ``backbone="inception_v3"`` (the public network): timm's Inception-v3 up to Mixed_6e, Linear(768, 100), Google's
    [-1, 1] input. ``backbone="efficientnet_lite0"`` (trained here, where no Inception weights exist): timm's
    EfficientNet-Lite0 features (conv head included, 1280 channels), Linear(1280, 100), ImageNet normalisation;
    ``init`` fills its trunk (:func:`data_prep.efficientnet.load_efficientnet_lite0`: the packaged ImageNet weights or
    a file), as magenta starts its Inception from ImageNet. Use it in ``eval()`` for inference: its BatchNorms
    otherwise use batch statistics (the public code's pitfall).
    """

    def __init__(self, style_dim: int = STYLE_DIM, backbone: str = "inception_v3", init: str | None = None) -> None:
        super().__init__()
        import timm

        if backbone not in PREDICTOR_BACKBONES:
            raise ValueError(f"StylePredictor backbone: one of {PREDICTOR_BACKBONES}, got {backbone!r}")
        self.backbone_name = backbone
        if backbone == "inception_v3":
            inception = timm.create_model("inception_v3", pretrained=False, num_classes=0)
            self.backbone = nn.Sequential(OrderedDict((name, getattr(inception, name)) for name in INCEPTION_TRUNK))
            self.fc = nn.Linear(768, style_dim)
            self.min_size = PREDICTOR_MIN_SIZE
        else:
            from data_prep.efficientnet import efficientnet_lite0

            self.backbone = efficientnet_lite0(init, num_classes=0)
            self.fc = nn.Linear(int(self.backbone.num_features), style_dim)
            self.min_size = EFFICIENTNET_MIN_SIZE
            self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, style_image: torch.Tensor) -> torch.Tensor:
        h, w = style_image.shape[-2:]
        if min(h, w) < self.min_size:
            raise ValueError(
                f"StylePredictor ({self.backbone_name}) needs images of at least {self.min_size}x{self.min_size}, got "
                f"{h}x{w}; upsample the input or run without the predictor (mean embedding)"
            )
        if self.backbone_name == "inception_v3":
            feats = self.backbone(inception_preprocess(style_image))
        else:
            x = (style_image - self.mean.to(style_image.dtype)) / self.std.to(style_image.dtype)
            feats = self.backbone.forward_features(x)
        return self.fc(feats.float().mean(dim=(2, 3)))


def predictor_for(meta: dict[str, str]) -> StylePredictor:
    """An empty predictor of the architecture a checkpoint's metadata names (files without the field: Inception)."""
    return StylePredictor(backbone=meta.get("predictor", "inception_v3"))


# ---------------------------------------------------------------------------------------------------------------
# The project's own style checkpoint.

CHECKPOINT_FORMAT = "style_checkpoint/v1"


def save_style_checkpoint(
    path: str | os.PathLike,
    transformer: StyleTransformer,
    predictor: StylePredictor | None,
    embedding_mean: torch.Tensor,
    embedding_cov: torch.Tensor,
    base_embedding: torch.Tensor | None = None,
    meta: dict[str, str] | None = None,
    packaged_trunk: bool = False,
) -> None:
    """Write transformer (+ predictor) weights and the style-embedding statistics.

    ``.safetensors`` paths are written with safetensors (keys prefixed ``transformer.``, ``predictor.``,
    ``stats.``); any other suffix is a ``torch.save`` dict readable with ``weights_only=True``. ``base_embedding``
    is the fixed embedding that stands in for P(c) without a predictor (the public files' ImageNet mean).
    ``packaged_trunk``: the predictor's EfficientNet-Lite0 trunk is the packaged ImageNet one, unchanged (it was
    frozen): leave it out of the file (13.7 MB) and let :func:`load_style_checkpoint` fill it from the package.
    """
    from launch.files import atomic_write_bytes

    tensors: dict[str, torch.Tensor] = {}
    for k, v in transformer.state_dict().items():
        tensors[f"transformer.{k}"] = v
    if predictor is not None:
        for k, v in predictor.state_dict().items():
            if not (packaged_trunk and k.startswith("backbone.")):
                tensors[f"predictor.{k}"] = v
    if packaged_trunk:
        meta = {**(meta or {}), "predictor_trunk": PACKAGED_TRUNK}
    tensors["stats.mean"] = embedding_mean.detach().to(torch.float64)
    tensors["stats.cov"] = embedding_cov.detach().to(torch.float64)
    if base_embedding is not None:
        tensors["stats.base"] = base_embedding.detach().to(torch.float64)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {"format": CHECKPOINT_FORMAT, **(meta or {})}
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import save

        atomic_write_bytes(p, save(tensors, metadata=header))
    else:
        import io

        buf = io.BytesIO()
        torch.save({"meta": header, "tensors": tensors}, buf)
        atomic_write_bytes(p, buf.getvalue())


def load_style_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :func:`save_style_checkpoint` (never unpickles code).

    Returns ``{"transformer": state_dict, "predictor": state_dict | None, "mean", "cov", "base", "meta"}``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"style checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    else:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "tensors" not in obj:
            raise ValueError(f"{p}: not a style checkpoint (expected a dict with 'tensors')")
        meta, tensors = dict(obj.get("meta", {})), obj["tensors"]
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    out: dict[str, Any] = {"transformer": {}, "predictor": {}, "meta": meta}
    for k, v in tensors.items():
        group, _, rest = k.partition(".")
        if group in ("transformer", "predictor"):
            out[group][rest] = v
        elif group == "stats" and rest in ("mean", "cov", "base"):
            out[rest] = v
        else:
            raise ValueError(f"{p}: unexpected tensor {k!r}")
    for need in ("mean", "cov"):
        if need not in out:
            raise ValueError(f"{p}: missing stats.{need}")
    if not out["transformer"]:
        raise ValueError(f"{p}: no transformer weights")
    out.setdefault("base", None)
    if meta.get("predictor_trunk") == PACKAGED_TRUNK and out["predictor"]:
        out["predictor"] = {**packaged_trunk_state(), **out["predictor"]}
    out["predictor"] = out["predictor"] or None
    return out


PACKAGED_TRUNK = "efficientnet_lite0_imagenet"  # checkpoint meta: the predictor trunk is the packaged one


def packaged_trunk_state() -> dict[str, torch.Tensor]:
    """The packaged ImageNet EfficientNet-Lite0 as a :class:`StylePredictor` ``backbone.*`` state dict."""
    from data_prep.efficientnet import efficientnet_lite0

    return {f"backbone.{k}": v for k, v in efficientnet_lite0(num_classes=0).state_dict().items()}
