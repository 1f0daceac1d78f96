"""Caption cleaning and image transforms shared by pretraining and fine-tuning.

Every random choice a train transform makes (crop box, flip, RandAugment ops) is drawn from a ``torch.Generator``
passed at call time, never from the global RNG. The loader seeds one generator per sample from
(seed, epoch, rank, worker, sample index), so a resumed run reproduces the same crops bit for bit, and a
transform call leaves the process-wide RNG state untouched.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ALBEF's pre_caption drops exactly these characters and turns '-' and '/' into spaces; other symbols stay.
_DROP_CHARS = re.compile(r"[,.'!?\"()*#:;~]")
_SPLIT_CHARS = re.compile(r"[-/]")
_SPACES = re.compile(r"\s+")

_FILL = (128, 128, 128)  # gray fill for the geometric RandAugment ops, as in ALBEF


def pre_caption(text: str, max_words: int = 30) -> str:
    """Clean a caption the ALBEF way: lowercase, drop punctuation, split on '-' and '/', collapse spaces, truncate.

    ``<person>`` placeholders (some CC3M captions) become ``person``. Returns ``""`` when nothing is left.
    """
    text = text.lower().replace("<person>", "person")
    text = _SPLIT_CHARS.sub(" ", text)
    text = _DROP_CHARS.sub("", text)
    words = _SPACES.sub(" ", text).strip().split(" ")
    if max_words > 0 and len(words) > max_words:
        words = words[:max_words]
    return " ".join(w for w in words if w)


def _uniform(gen: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator | None, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=gen))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Box ``(left, top, w, h)`` of a random crop covering ``scale`` of the area with aspect ratio in ``ratio``.

    Same sampling rule as torchvision's RandomResizedCrop (ten tries, then a centre crop with the ratio clamped),
    but every draw comes from ``generator``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, height - h + 1)
            left = _randint(generator, width - w + 1)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


@functools.lru_cache(maxsize=16)
def _affine_params(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32).view(3, 1, 1)
    return scale, shift


def to_normalized_tensor(
    img: Image.Image, mean: Sequence[float], std: Sequence[float], out: torch.Tensor | None = None
) -> torch.Tensor:
    """RGB PIL image -> float tensor ``[3,H,W]`` holding ``(x/255 - mean) / std`` per channel.

    ``out`` (e.g. a slice of a preallocated batch) receives the result, saving an allocation and a copy.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.array(img, dtype=np.uint8)  # a writable HWC copy (np.asarray of a PIL image is read-only)
    x = torch.empty((3, arr.shape[0], arr.shape[1]), dtype=torch.float32) if out is None else out
    x.copy_(torch.from_numpy(arr).permute(2, 0, 1))  # transpose and convert in one pass
    scale, shift = _affine_params(tuple(mean), tuple(std))
    return x.mul_(scale).add_(shift)


def denormalize(
    tensor: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> torch.Tensor:
    """Invert the normalization of ``[3,H,W]`` or ``[B,3,H,W]`` images to [0, 1] (for TensorBoard grids)."""
    shape = (3, 1, 1) if tensor.dim() == 3 else (1, 3, 1, 1)
    m = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(shape)
    s = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(shape)
    return (tensor * s + m).clamp(0.0, 1.0)


def _signed(gen: torch.Generator | None, value: float) -> float:
    return value if _randint(gen, 2) else -value


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)


class RandAugment:
    """ALBEF's RandomAugment(N=2, M=7) op set: pick ``num_ops`` ops uniformly, apply each with probability 1/2.

    Magnitude ``m = magnitude/10`` scales each op: enhance factors ``1 ± 0.9m``, shear ``± 0.3m``, translate
    ``± 0.1m`` of the side, rotation ``± 30m`` degrees (sign drawn per op).
    """

    OPS = (
        "identity",
        "autocontrast",
        "equalize",
        "brightness",
        "sharpness",
        "shear_x",
        "shear_y",
        "translate_x",
        "translate_y",
        "rotate",
    )

    def __init__(self, num_ops: int = 2, magnitude: int = 7) -> None:
        self.num_ops = num_ops
        self.m = magnitude / 10.0

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        for _ in range(self.num_ops):
            op = self.OPS[_randint(generator, len(self.OPS))]
            apply = float(torch.rand((), generator=generator)) < 0.5
            sign_draw = _signed(generator, 1.0)  # always drawn so the RNG stream does not depend on the op
            if apply:
                img = self._apply(img, op, sign_draw)
        return img

    def _apply(self, img: Image.Image, op: str, sign: float) -> Image.Image:
        m = self.m
        w, h = img.size
        if op == "autocontrast":
            return ImageOps.autocontrast(img)
        if op == "equalize":
            return ImageOps.equalize(img)
        if op == "brightness":
            return ImageEnhance.Brightness(img).enhance(1.0 + sign * 0.9 * m)
        if op == "sharpness":
            return ImageEnhance.Sharpness(img).enhance(1.0 + sign * 0.9 * m)
        if op == "shear_x":
            return _affine(img, (1.0, sign * 0.3 * m, 0.0, 0.0, 1.0, 0.0))
        if op == "shear_y":
            return _affine(img, (1.0, 0.0, 0.0, sign * 0.3 * m, 1.0, 0.0))
        if op == "translate_x":
            return _affine(img, (1.0, 0.0, sign * 0.1 * m * w, 0.0, 1.0, 0.0))
        if op == "translate_y":
            return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, sign * 0.1 * m * h))
        if op == "rotate":
            return img.rotate(sign * 30.0 * m, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
        return img


class ColorAugment:
    """TCL's extra view augmentations, in its order: colour jitter (brightness, contrast, saturation 0.4, hue 0.1;
    the four in a random order, as torchvision) with probability 0.8, grayscale with probability 0.2, Gaussian
    blur with sigma uniform in [0.1, 2] with probability 0.5. Every draw comes from the generator, and every draw
    is made whether or not the op applies, so the stream does not depend on the image."""

    def __init__(
        self, jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1), p_jitter: float = 0.8,
        p_gray: float = 0.2, p_blur: float = 0.5, sigma: tuple[float, float] = (0.1, 2.0),
    ) -> None:  # fmt: skip
        self.jitter, self.p_jitter, self.p_gray, self.p_blur, self.sigma = jitter, p_jitter, p_gray, p_blur, sigma

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        b, c, s, h = self.jitter
        do_jitter = float(torch.rand((), generator=generator)) < self.p_jitter
        order = torch.randperm(4, generator=generator).tolist()
        factors = [_uniform(generator, max(0.0, 1 - v), 1 + v) for v in (b, c, s)] + [_uniform(generator, -h, h)]
        do_gray = float(torch.rand((), generator=generator)) < self.p_gray
        do_blur = float(torch.rand((), generator=generator)) < self.p_blur
        radius = _uniform(generator, *self.sigma)
        if do_jitter:
            for op in order:
                if op == 0:
                    img = ImageEnhance.Brightness(img).enhance(factors[0])
                elif op == 1:
                    img = ImageEnhance.Contrast(img).enhance(factors[1])
                elif op == 2:
                    img = ImageEnhance.Color(img).enhance(factors[2])
                else:
                    img = _shift_hue(img, factors[3])
        if do_gray:
            img = img.convert("L").convert("RGB")
        if do_blur:
            img = img.filter(ImageFilter.GaussianBlur(radius=radius))
        return img


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Rotate the hue by ``shift`` of a full turn (torchvision's ``adjust_hue``), via PIL's 8-bit HSV."""
    h, s, v = img.convert("HSV").split()
    delta = int(round(shift * 255))
    h = h.point(lambda x: (x + delta) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class TrainTransform:
    """RandomResizedCrop (bicubic) -> optional TCL colour augmentation -> horizontal flip -> optional RandAugment
    -> tensor -> normalize."""

    def __init__(
        self,
        image_size: int,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        randaugment: bool = False,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        flip: bool = True,
        color: bool = False,
    ) -> None:
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale}")
        self.image_size = int(image_size)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.flip = flip
        self.randaugment = RandAugment() if randaugment else None
        self.color = ColorAugment() if color else None
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, img: Image.Image, generator: torch.Generator | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.crop_scale, generator=generator)
        size = (self.image_size, self.image_size)
        # resize with a box crops and resamples in one (antialiased) pass
        img = img.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if self.color is not None:
            img = self.color(img, generator)
        if self.flip and float(torch.rand((), generator=generator)) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            img = self.randaugment(img, generator)
        return to_normalized_tensor(img, self.mean, self.std, out)


class EvalTransform:
    """Resize to a square (bicubic) -> tensor -> normalize. Deterministic; accepts and ignores a generator."""

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> None:
        self.image_size = int(image_size)
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(
        self, img: Image.Image, generator: torch.Generator | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return to_normalized_tensor(img, self.mean, self.std, out)


def train_transform(
    image_size: int,
    crop_scale: tuple[float, float] = (0.5, 1.0),
    randaugment: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    flip: bool = True,
    color: bool = False,
) -> TrainTransform:
    """ALBEF's pretraining augmentation (``color``: plus TCL's); call as ``tf(pil_image, generator[, out=tensor])``."""
    return TrainTransform(image_size, crop_scale, randaugment, mean, std, flip, color)


def eval_transform(
    image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD
) -> EvalTransform:
    """Square resize + normalize; call the result as ``tf(pil_image)``."""
    return EvalTransform(image_size, mean, std)
