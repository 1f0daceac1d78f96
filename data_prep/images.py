"""Decode → resize → JPEG encode, the per-image work of every shard writer.

Decoding is the content check: bytes are an image only if PIL can open *and* fully load them, whatever their file
extension or HTTP content-type said. PIL's decompression-bomb guard is enforced explicitly (an image whose header
claims more than ``max_pixels`` pixels is refused before its pixels are decoded).
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Literal

from PIL import Image, ImageOps, UnidentifiedImageError

ResizeMode = Literal["keep_ratio", "center_crop", "pad"]
RESIZE_MODES: tuple[str, ...] = ("keep_ratio", "center_crop", "pad")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default for Image.MAX_IMAGE_PIXELS
_ORIENTATION = 0x0112  # EXIF tag
PAD_COLOR = (255, 255, 255)  # img2dataset's "border" mode pads with white


class ImageError(Exception):
    """An image that cannot be used; ``reason`` is a short category used for failure counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass
class ProcessedImage:
    """An encoded RGB JPEG with its size after resizing and the size of the decoded original."""

    jpg: bytes
    width: int
    height: int
    orig_width: int
    orig_height: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Only the explicit check below decides on bombs; the warning is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError("decompression bomb", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not an image", "cannot identify image data") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError("not an image", str(exc)) from exc
    w, h = img.size
    if w < 1 or h < 1:
        raise ImageError("not an image", f"empty image {w}x{h}")
    if w * h > max_pixels:
        raise ImageError("decompression bomb", f"{w}x{h} pixels exceeds max_pixels={max_pixels}")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB without surprises: transparency is composited on white (not turned black), CMYK/16-bit/palette converted."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, PAD_COLOR)
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale to 8 bits instead of clipping everything above 255 to white.
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def target_size(width: int, height: int, image_size: int, resize_mode: str) -> tuple[int, int]:
    """Size the image is resized to before any crop or pad (shorter side, or longer side for ``pad``)."""
    if resize_mode == "pad":
        scale = image_size / max(width, height)
    else:
        scale = image_size / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize(img: Image.Image, image_size: int, resize_mode: str) -> Image.Image:
    """Apply ``resize_mode`` to an RGB image.

    keep_ratio: shorter side = image_size; center_crop: then a centred square crop; pad: longer side = image_size,
    then padded to a square with white borders.
    """
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
    w, h = img.size
    tw, th = target_size(w, h, image_size, resize_mode)
    if (tw, th) != (w, h):
        # reducing_gap makes large downscales a cheap box reduce followed by a short bicubic pass.
        img = img.resize((tw, th), Image.Resampling.BICUBIC, reducing_gap=3.0)
    if resize_mode == "center_crop" and (tw, th) != (image_size, image_size):
        left = (tw - image_size) // 2
        top = (th - image_size) // 2
        img = img.crop((left, top, left + image_size, top + image_size))
    elif resize_mode == "pad" and (tw, th) != (image_size, image_size):
        canvas = Image.new("RGB", (image_size, image_size), PAD_COLOR)
        canvas.paste(img, ((image_size - tw) // 2, (image_size - th) // 2))
        img = canvas
    return img


def decode_resize(
    src: bytes | Image.Image,
    image_size: int,
    resize_mode: str = "keep_ratio",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[Image.Image, int, int]:
    """Decode ``src``, fix orientation, convert to RGB and resize: ``(image, orig_width, orig_height)``.

    A JPEG larger than the target is decoded at reduced scale in the DCT domain (libjpeg's 1/2, 1/4, 1/8 scaling
    through PIL's ``draft``, to the smallest scale still >= the target size), then resized with antialiasing to
    the exact size; for 512² -> 256² that skips most of the decoding work (quality: docs/data_prep.md, Throughput).
    Raises :class:`ImageError` like :func:`process_image`.
    """
    if isinstance(src, Image.Image):
        img = src
        if img.width * img.height > max_pixels:
            raise ImageError("decompression bomb", f"{img.width}x{img.height} exceeds max_pixels={max_pixels}")
        orig_w, orig_h = img.size
    else:
        img = _open(bytes(src), max_pixels)
        orig_w, orig_h = img.size
        if img.format == "JPEG":
            # the stored (pre-EXIF-rotation) orientation: a rotation swaps both sides alike, so the scale is the same
            tw, th = target_size(orig_w, orig_h, image_size, resize_mode)
            if tw < orig_w and th < orig_h:
                img.draft("RGB", (tw, th))
        try:
            img.load()
        except Image.DecompressionBombError as exc:
            raise ImageError("decompression bomb", str(exc)) from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError("corrupt image", str(exc)) from exc
        orientation = img.getexif().get(_ORIENTATION, 1)
        if orientation in (5, 6, 7, 8):
            orig_w, orig_h = orig_h, orig_w  # stored sideways: the upright original is transposed
        if orientation in (2, 3, 4, 5, 6, 7, 8):
            img = ImageOps.exif_transpose(img)
    tw, th = target_size(img.width, img.height, image_size, resize_mode)
    if tw * th > max_pixels:
        # keep_ratio on a 10000x10 strip would allocate a gigapixel image
        raise ImageError("extreme aspect ratio", f"{img.width}x{img.height} would resize to {tw}x{th}")
    try:
        return resize(_to_rgb(img), image_size, resize_mode), orig_w, orig_h
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError("corrupt image", str(exc)) from exc


def process_image(
    src: bytes | Image.Image,
    image_size: int,
    resize_mode: str = "keep_ratio",
    jpeg_quality: int = 95,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ProcessedImage:
    """Decode ``src`` (encoded bytes or a PIL image), fix orientation, convert to RGB, resize, encode as JPEG.

    Raises :class:`ImageError` with reason ``not an image``, ``corrupt image``, ``decompression bomb`` or
    ``extreme aspect ratio`` (the resized image would exceed ``max_pixels``).
    """
    out, orig_w, orig_h = decode_resize(src, image_size, resize_mode, max_pixels)
    buf = io.BytesIO()
    try:
        out.save(buf, format="JPEG", quality=jpeg_quality)
    except (OSError, ValueError) as exc:
        raise ImageError("corrupt image", str(exc)) from exc
    return ProcessedImage(buf.getvalue(), out.width, out.height, orig_w, orig_h)
