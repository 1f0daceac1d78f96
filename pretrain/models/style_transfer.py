"""Training the style-randomization network (Ghiasi et al. 2017) as a pretraining recipe on the shared engine.

``model(batch)``: the content images are ``batch["image"]`` (our shards through the shared loader, de-normalized
with the loader's mean/std), the style images come from ``model.style_dir`` (any folder tree of images, e.g.
Painter by Numbers + DTD) through a deterministic sampler seeded by (run seed, step, rank), so a resumed run sees
the same style images. ``z = predictor(style)``, ``stylized = transformer(content, z)`` and the loss is

    content_weight * mean((phi3(c) - phi3(T(c)))^2)                       VGG-16 relu3_3
  + sum_l style_weights[l] * mean((G_l(T(c)) - G_l(s))^2)                 relu1_2, relu2_2, relu3_3, relu4_3
  + tv_weight * (l2(dy) / ((H-1) W C) + l2(dx) / (H (W-1) C)) / B        l2(x) = sum(x^2) / 2

with the Gram matrix ``G = F F^T / (H W)`` (C x C per image) and magenta's defaults (1, 5e-4 each, 1e4). The
transformer and the style predictor are trained jointly; the VGG-16 loss network (average pooling, as magenta) is
frozen. Where VGG-16 weights cannot be had (``model.loss_network: auto`` without local VGG weights), the loss
network is the ImageNet EfficientNet-Lite0 of the offline package instead: Gram matrices of its first four stage
outputs for style, the third (stride 8) for content; the predictor is then EfficientNet-Lite0 + Linear(1280, 100)
(``model.predictor``). The checkpoint's metadata names both. At the end of training
(:meth:`StyleTransferModel.on_train_end`, called by the engine) the predictor's embedding mean and covariance
over the style images are written with both networks to
``run.dir/style_checkpoint.safetensors`` in the format ``data_prep style`` loads (:func:`save_style_checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from data_prep import efficientnet as effnet
from data_prep.style.network import (
    EFFICIENTNET_MIN_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREDICTOR_MIN_SIZE,
    STYLE_DIM,
    StylePredictor,
    StyleTransformer,
    load_style_checkpoint,
    save_style_checkpoint,
)
from launch.config import ConfigError
from pretrain.models import ModelOptions, register

log = logging.getLogger("vlp.style_transfer")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHECKPOINT_NAME = "style_checkpoint.safetensors"
# torchvision vgg16().features indices of the ReLU after conv1_2, conv2_2, conv3_3, conv4_3
VGG_ENDPOINTS = {"conv1_2": 3, "conv2_2": 8, "conv3_3": 15, "conv4_3": 22}
STYLE_LAYERS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3")
CONTENT_LAYER = "conv3_3"


@dataclasses.dataclass
class StyleTransferOptions(ModelOptions):
    name: str = "style_transfer"
    style_dir: str = ""  # folder tree of style images (PBN + DTD); required
    # "torchvision": ImageNet weights from torchvision's (or timm's) cache/hub; a path: a local vgg16 state dict;
    # "random": RANDOM loss network (tests and smoke runs only: the losses then carry no perceptual meaning)
    vgg_weights: str = "torchvision"
    # auto: VGG-16 when its weights are present locally (vgg_weights a file or 'random', or torchvision's cache holds
    # them), else EfficientNet-Lite0 (the offline ImageNet package); or name one: vgg16 | efficientnet_lite0
    loss_network: str = "auto"
    # auto: EfficientNet-Lite0 (ImageNet init) when the package is installed, else Inception-v3 (random init)
    predictor: str = "auto"
    # all: the whole predictor trains (magenta); head: its ImageNet trunk stays frozen (eval mode), only the final
    # Linear to the 100-d embedding trains (a CPU budget: no backward through the trunk's depthwise convolutions)
    predictor_train: str = "all"
    content_weight: float = 1.0
    style_weights: tuple[float, float, float, float] = (5e-4, 5e-4, 5e-4, 5e-4)
    tv_weight: float = 1e4
    style_size: int = 256  # style images: shorter side resized to style_size * U[1, style_scale), random crop
    style_scale: float = 1.5
    style_flip: bool = True
    image_log_every: int = 0  # steps between TensorBoard grids of content / style / stylized (0: off)
    image_log_count: int = 4
    stats_batch: int = 8  # style images per predictor call when computing the embedding statistics
    stats_max_images: int = 0  # 0: every style image
    # a style checkpoint (the stage's file) to start the transformer and predictor from: fine-tunes an existing
    # network, e.g. with another content weight; "" trains from scratch. A resumed run ignores it (its own
    # checkpoint wins)
    init_checkpoint: str = ""

    def validate(self, recipe: Any) -> None:
        if not self.style_dir:
            raise ConfigError("model.style_dir: required (a folder of style images, e.g. PBN + DTD)")
        if not Path(self.style_dir).is_dir():
            raise ConfigError(f"model.style_dir: not a folder: {self.style_dir}")
        if self.vgg_weights not in ("torchvision", "random") and not Path(self.vgg_weights).is_file():
            raise ConfigError(f"model.vgg_weights: 'torchvision', 'random' or an existing file, got {self.vgg_weights}")
        if self.loss_network not in ("auto", "vgg16", "efficientnet_lite0"):
            raise ConfigError(f"model.loss_network: auto, vgg16 or efficientnet_lite0, got {self.loss_network}")
        if self.predictor_train not in ("all", "head"):
            raise ConfigError(f"model.predictor_train: all or head, got {self.predictor_train}")
        if self.predictor not in ("auto", "inception_v3", "efficientnet_lite0"):
            raise ConfigError(f"model.predictor: auto, inception_v3 or efficientnet_lite0, got {self.predictor}")
        self.loss_network = resolve_loss_network(self.loss_network, self.vgg_weights)
        self.predictor = resolve_predictor(self.predictor)
        if "efficientnet_lite0" in (self.loss_network, self.predictor):
            effnet.require_package(
                "model.loss_network" if self.loss_network == "efficientnet_lite0" else "model.predictor"
            )
        least = PREDICTOR_MIN_SIZE if self.predictor == "inception_v3" else EFFICIENTNET_MIN_SIZE
        if self.style_size < least:
            raise ConfigError(f"model.style_size: the {self.predictor} style predictor needs >= {least} px")
        if self.style_scale < 1.0:
            raise ConfigError("model.style_scale: must be >= 1")
        if self.init_checkpoint:
            self._check_init_checkpoint()
        mix = getattr(recipe, "mixgen", None)
        if mix is not None and mix.enabled:
            raise ConfigError(
                "mixgen.enabled: must be false for model style_transfer (MixGen would blend content images and "
                "rewrite captions the style network never reads); set mixgen.enabled=false"
            )

    def _check_init_checkpoint(self) -> None:
        """Refuse, while the config is read, a start file that is missing or of another architecture."""
        try:
            meta = load_style_checkpoint(self.init_checkpoint)["meta"]
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"model.init_checkpoint: {exc}") from exc
        if meta.get("predictor", "inception_v3") != self.predictor:
            raise ConfigError(
                f"model.init_checkpoint: {self.init_checkpoint} holds a {meta.get('predictor', 'inception_v3')} "
                f"predictor, this recipe trains {self.predictor} (model.predictor)"
            )


# ------------------------------------------------------------------------------------------------ losses


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``F F^T / (H W)`` per image: ``[B, C, H, W] -> [B, C, C]`` (magenta's normalisation, by H*W only)."""
    b, c, h, w = features.shape
    f = features.reshape(b, c, h * w).float()
    return torch.bmm(f, f.transpose(1, 2)) / (h * w)


def content_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() - b.float()).pow(2).mean()


def style_loss(gram_out: torch.Tensor, gram_style: torch.Tensor) -> torch.Tensor:
    return (gram_out - gram_style).pow(2).mean()


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Magenta's TV: (l2(dy) / ((H-1) W C) + l2(dx) / (H (W-1) C)) / B with l2 = sum(x^2) / 2."""
    b, c, h, w = x.shape
    x = x.float()
    dy = x[:, :, 1:, :] - x[:, :, :-1, :]
    dx = x[:, :, :, 1:] - x[:, :, :, :-1]
    return (0.5 * dy.pow(2).sum() / ((h - 1) * w * c) + 0.5 * dx.pow(2).sum() / (h * (w - 1) * c)) / b


# ------------------------------------------------------------------------------------------------ VGG-16


class VGGLoss(nn.Module):
    """Frozen VGG-16 features to relu4_3 with average pooling; ``forward([0,1] images) -> {layer: features}``."""

    def __init__(self, weights: str) -> None:
        super().__init__()
        import torchvision

        features = torchvision.models.vgg16(weights=None).features[: VGG_ENDPOINTS["conv4_3"] + 1]
        if weights == "random":
            log.warning("model.vgg_weights=random: RANDOM VGG-16 loss network (tests/smoke runs only)")
        elif weights == "torchvision":
            features.load_state_dict(_pretrained_vgg_features(), strict=False)
        else:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            for key in ("state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(key), dict):
                    state = state[key]
            state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")}
            own = features.state_dict()
            missing = [k for k in own if k not in state]
            if missing:
                raise ValueError(f"model.vgg_weights {weights}: not a VGG-16 state dict (missing {missing[:4]})")
            features.load_state_dict({k: state[k] for k in own})
        # magenta's loss network pools by averaging
        for i, m in enumerate(features):
            if isinstance(m, nn.MaxPool2d):
                features[i] = nn.AvgPool2d(kernel_size=2, stride=2)
        self.features = features.eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._names = {idx: name for name, idx in VGG_ENDPOINTS.items()}

    def train(self, mode: bool = True) -> VGGLoss:
        return super().train(False)  # frozen: never in training mode

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (images.float() - self.mean) / self.std  # autocast (bf16 weights) casts it for the convs
        out = {}
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._names:
                out[self._names[i]] = x
        return out


def _pretrained_vgg_features() -> dict[str, torch.Tensor]:
    """ImageNet VGG-16 feature weights from torchvision (or timm) if they are cached or downloadable."""
    errors = []
    try:
        import torchvision

        model = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1)
        return model.features.state_dict()
    except Exception as exc:  # offline, no cache
        errors.append(f"torchvision: {type(exc).__name__}: {exc}")
    try:
        import timm

        model = timm.create_model("vgg16.tv_in1k", pretrained=True)
        return {k.removeprefix("features."): v for k, v in model.state_dict().items() if k.startswith("features.")}
    except Exception as exc:
        errors.append(f"timm: {type(exc).__name__}: {exc}")
    raise RuntimeError(
        "model.vgg_weights=torchvision: no ImageNet VGG-16 weights available ("
        + "; ".join(errors)
        + "). Set model.vgg_weights to a local vgg16 state-dict file, or 'random' for a smoke test."
    )


# ------------------------------------------------------------------------------------------------ EfficientNet-Lite0

# outputs of timm efficientnet_lite0's first four stages: 16, 24, 40, 80 channels at strides 2, 4, 8, 16
LITE0_STYLE_LAYERS = ("block0", "block1", "block2", "block3")
LITE0_CONTENT_LAYER = "block2"


class EfficientNetLoss(nn.Module):
    """Frozen ImageNet EfficientNet-Lite0 stem + first four stages: ``forward([0,1] images) -> {blockN: features}``.

    The offline stand-in for VGG-16 (whose weights cannot be had here): Gram matrices of the four stage outputs
    (strides 2 to 16, like VGG's conv1..conv4) carry style, the stride-8 stage the content.
    """

    def __init__(self, init: str = effnet.EFFICIENTNET_LITE0_IMAGENET) -> None:
        super().__init__()
        net = effnet.efficientnet_lite0(init, num_classes=0)
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        self.blocks = nn.ModuleList(net.blocks[: len(LITE0_STYLE_LAYERS)])
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> EfficientNetLoss:
        return super().train(False)  # frozen: batch norm keeps its ImageNet statistics

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem((images.float() - self.mean) / self.std)
        out = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            out[f"block{i}"] = x
        return out


def vgg_weights_local(vgg_weights: str) -> bool:
    """Whether VGG-16 weights can be had without a network: a file, 'random' (smoke runs), or torchvision's cache."""
    if vgg_weights != "torchvision":
        return True
    import torch.hub

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return any(cache.glob("vgg16-*.pth")) if cache.is_dir() else False


def resolve_loss_network(choice: str, vgg_weights: str) -> str:
    if choice != "auto":
        return choice
    return "vgg16" if vgg_weights_local(vgg_weights) else "efficientnet_lite0"


def resolve_predictor(choice: str) -> str:
    if choice != "auto":
        return choice
    return "efficientnet_lite0" if effnet.package_available() else "inception_v3"


# ------------------------------------------------------------------------------------------------ style images


def list_images(root: str | os.PathLike) -> list[Path]:
    """Image files under ``root`` (recursive, sorted: the sampler's index space)."""
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ConfigError(f"model.style_dir: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    return files


def _seed(*parts: int | str) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StyleImages:
    """Deterministic style batches: ``batch(seed, step, rank, n)`` depends only on its arguments and the folder.

    A file that cannot be decoded is reported once, remembered and replaced by the next draw of the same
    generator (so the replacement is deterministic too).
    """

    def __init__(self, root: str, size: int, scale: float = 1.5, flip: bool = True) -> None:
        self.files = list_images(root)
        self.size, self.scale, self.flip = size, scale, flip
        self.bad: set[int] = set()

    def load(self, index: int) -> Image.Image | None:
        if index in self.bad:
            return None
        path = self.files[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:  # any decode failure: report and skip this file
            self.bad.add(index)
            log.warning("style image %s unreadable (%s: %s): skipped", path, type(exc).__name__, exc)
            return None

    def _crop(self, img: Image.Image, gen: torch.Generator) -> torch.Tensor:
        s = self.size * (1.0 + (self.scale - 1.0) * torch.rand((), generator=gen).item())
        w, h = img.size
        r = s / min(w, h)
        nw, nh = max(self.size, round(w * r)), max(self.size, round(h * r))
        img = img.resize((nw, nh), Image.BILINEAR)
        x0 = int(torch.randint(0, nw - self.size + 1, (), generator=gen))
        y0 = int(torch.randint(0, nh - self.size + 1, (), generator=gen))
        flip = bool(torch.rand((), generator=gen) < 0.5) and self.flip
        img = img.crop((x0, y0, x0 + self.size, y0 + self.size))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img)

    def batch(self, seed: int, step: int, rank: int, n: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(_seed(seed, step, rank))
        out = []
        tries = 0
        while len(out) < n:
            tries += 1
            if tries > 50 * n + len(self.files):
                raise RuntimeError(f"model.style_dir: too many unreadable style images ({len(self.bad)} so far)")
            img = self.load(int(torch.randint(0, len(self.files), (), generator=gen)))
            if img is not None:
                out.append(self._crop(img, gen))
        return torch.stack(out)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0


# ------------------------------------------------------------------------------------------------ the model


class StyleTransferModel(nn.Module):
    """Transformer + predictor (trained jointly) + frozen VGG-16 loss network."""

    def __init__(self, opts: StyleTransferOptions) -> None:
        super().__init__()
        self.opts = opts
        self.transformer = StyleTransformer()
        if opts.predictor == "efficientnet_lite0":
            # ImageNet init, trained jointly (magenta starts its Inception-v3 from ImageNet too)
            self.predictor = StylePredictor(backbone="efficientnet_lite0", init=effnet.EFFICIENTNET_LITE0_IMAGENET)
        else:
            self.predictor = StylePredictor()
        if opts.predictor_train == "head":
            for p in self.predictor.backbone.parameters():
                p.requires_grad_(False)
            self.predictor.backbone.eval()
        if opts.loss_network == "vgg16":
            self.vgg = VGGLoss(opts.vgg_weights)
            self.style_layers, self.content_layer = STYLE_LAYERS, CONTENT_LAYER
        else:
            self.vgg = EfficientNetLoss()
            self.style_layers, self.content_layer = LITE0_STYLE_LAYERS, LITE0_CONTENT_LAYER
        if opts.init_checkpoint:
            start = load_style_checkpoint(opts.init_checkpoint)
            self.transformer.load_state_dict(start["transformer"])
            if start["predictor"] is not None:
                self.predictor.load_state_dict(start["predictor"])
            log.info("transformer and predictor start from %s", opts.init_checkpoint)
        self.styles = StyleImages(opts.style_dir, opts.style_size, opts.style_scale, opts.style_flip)
        self.register_buffer("data_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("data_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.seed = 0
        self._configured = False
        self._images: dict[str, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> StyleTransferModel:
        super().train(mode)
        if self.opts.predictor_train == "head":
            self.predictor.backbone.eval()  # frozen trunk: batch norm keeps its ImageNet statistics
        return self

    # -- engine hooks -------------------------------------------------------------------------------------------
    def configure(self, cfg: Any) -> None:
        """Called by the engine with the validated recipe: adopt the loader's mean/std and the seed."""
        self.data_mean.copy_(torch.tensor(cfg.data.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.data_std.copy_(torch.tensor(cfg.data.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.seed = int(cfg.run.seed)
        self._configured = True

    def images_to_log(self) -> dict[str, torch.Tensor] | None:
        """Content / style / stylized images ([N,3,H,W] in [0,1]) kept by the last forward, once."""
        images, self._images = self._images, None
        return images

    def on_train_end(self, run_dir: str | os.PathLike) -> dict[str, Any]:
        """Every rank embeds its share of the style images; rank 0 writes the stage's checkpoint file."""
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        path = Path(run_dir) / CHECKPOINT_NAME
        mine = self.style_embeddings(rank, world)
        if world > 1:
            shares: list[Any] = [None] * world
            dist.all_gather_object(shares, mine)
        else:
            shares = [mine]
        if rank != 0:
            return {"style_checkpoint": str(path)}
        z = torch.cat(shares)
        if z.shape[0] < 2:
            raise RuntimeError(
                f"model.style_dir: need >= 2 readable style images for a covariance ({self.opts.style_dir})"
            )
        mean, cov, count = z.mean(0), torch.cov(z.T), z.shape[0]  # cov: unbiased, as np.cov
        save_style_checkpoint(
            path,
            self.transformer,
            self.predictor,
            mean,
            cov,
            meta={"source": "pretrain style_transfer", "style_dir": str(self.opts.style_dir),
                  "loss_network": self.opts.loss_network, "predictor": self.opts.predictor,
                  "predictor_train": self.opts.predictor_train,
                  "content_layer": self.content_layer, "style_layers": ",".join(self.style_layers),
                  "content_weight": str(self.opts.content_weight),
                  "style_weights": ",".join(str(w) for w in self.opts.style_weights),
                  "tv_weight": str(self.opts.tv_weight), "style_size": str(self.opts.style_size),
                  "vgg_weights": self.opts.vgg_weights if self.opts.loss_network == "vgg16" else "",
                  "stats_images": str(count), "init_checkpoint": self.opts.init_checkpoint},
        )  # fmt: skip
        log.info("style checkpoint with embedding statistics over %d style images: %s", count, path)
        return {"style_checkpoint": str(path), "style_stats_images": count}

    # -- statistics ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def style_embeddings(self, rank: int = 0, world: int = 1) -> torch.Tensor:
        """Predictor (eval mode) embeddings [n, 100] (float64) of style images ``rank::world``, each plainly
        resized to style_size (as the public statistics script); unreadable files are reported and left out."""
        was = self.predictor.training
        self.predictor.eval()
        device = next(self.predictor.parameters()).device
        indices = range(len(self.styles.files))
        if self.opts.stats_max_images:
            indices = indices[: self.opts.stats_max_images]
        embeds, pending = [torch.empty(0, STYLE_DIM, dtype=torch.float64)], []

        def flush() -> None:
            with self._autocast(device):
                embeds.append(self.predictor(torch.stack(pending).to(device)).double().cpu())
            pending.clear()

        for idx in indices[rank::world]:
            img = self.styles.load(idx)
            if img is None:
                continue
            pending.append(_to_tensor(img.resize((self.opts.style_size, self.opts.style_size), Image.BILINEAR)))
            if len(pending) == self.opts.stats_batch:
                flush()
        if pending:
            flush()
        self.predictor.train(was)
        if self.opts.predictor_train == "head":
            self.predictor.backbone.eval()
        return torch.cat(embeds)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """bf16 autocast when DeepSpeed holds the weights in bf16 (inputs stay fp32; losses are computed in fp32)."""
        dtype = next(self.transformer.parameters()).dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # -- training -----------------------------------------------------------------------------------------------
    def losses(self, content: torch.Tensor, style: torch.Tensor, stylized: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted objectives for [0,1] images (VGG under bf16 autocast when the weights are bf16; the loss
        arithmetic in fp32)."""
        o = self.opts
        with self._autocast(stylized.device):
            out_feats = self.vgg(stylized)
            with torch.no_grad():
                c_feats = self.vgg(content)
                s_feats = self.vgg(style)
        lc = o.content_weight * content_loss(out_feats[self.content_layer], c_feats[self.content_layer])
        ls = stylized.new_zeros((), dtype=torch.float32)
        for w, name in zip(o.style_weights, self.style_layers):
            ls = ls + w * style_loss(gram_matrix(out_feats[name]), gram_matrix(s_feats[name]))
        ltv = o.tv_weight * total_variation(stylized)
        return {"content": lc, "style": ls, "tv": ltv}

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self._configured:
            raise RuntimeError("StyleTransferModel.configure(cfg) must run before training (the engine calls it)")
        images = batch["image"]
        content = (images.float() * self.data_std + self.data_mean).clamp(0, 1)
        step = int(batch.get("step", 0) or 0)
        rank = dist.get_rank() if dist.is_initialized() else 0
        style = self.styles.batch(self.seed, step, rank, content.shape[0]).to(content.device)
        with self._autocast(content.device):
            z = self.predictor(style)
            stylized = self.transformer(content, z).float()
        losses = self.losses(content, style, stylized)
        every = int(self.opts.image_log_every)
        if every and rank == 0 and (step + 1) % every == 0:
            k = self.opts.image_log_count
            self._images = {
                "content": content[:k].detach().cpu(),
                "style": style[:k].detach().cpu(),
                "stylized": stylized[:k].detach().float().cpu(),
            }
        return {"loss": losses["content"] + losses["style"] + losses["tv"], "losses": losses}


@register("style_transfer", StyleTransferOptions)
def build(opts: StyleTransferOptions) -> nn.Module:
    return StyleTransferModel(opts)
