"""Boxes, IoU, Grad-CAM maps and proposal ranking for weakly-supervised grounding (RefCOCO+ protocol).

Boxes are COCO ``[x, y, w, h]`` in pixels of the original image. IoU follows the RefCOCO tooling (``computeIoU``):
inclusive pixel coordinates, so a box covers ``w`` columns ``x .. x + w - 1`` (see :func:`iou` for its one quirk).
A prediction is a hit when IoU >= 0.5 (ALBEF; ReCLIP uses > 0.5).

Ranking (ALBEF's ``grounding_eval``): a heat map is upsampled to the image's height x width (bicubic, undoing the
square resize the model saw), each proposal scores ``map[y:y+h, x:x+w].sum() / (w * h) ** alpha`` on the
integer-truncated box (``alpha = 0.5``: between total mass and mean density), and the best proposal wins. Unlike
ALBEF, the best score starts at ``-inf`` for every expression, so a map that is negative everywhere (bicubic
overshoot) still picks a box of this expression rather than the previous one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Box = Sequence[float]  # [x, y, w, h]


def xyxy_to_xywh(box: Sequence[float]) -> list[float]:
    """``(x0, y0, x1, y1)`` (exclusive corner) -> ``[x, y, w, h]``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def normalized_to_pixels(box: Sequence[float], width: int, height: int) -> list[float]:
    """A normalized ``(x0, y0, x1, y1)`` box (the synthetic set's) -> pixel ``[x, y, w, h]``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * width, y0 * height, (x1 - x0) * width, (y1 - y0) * height]


def iou(a: Box, b: Box, inclusive: bool = True) -> float:
    """IoU of two ``[x, y, w, h]`` boxes.

    ``inclusive`` (default) is the RefCOCO tooling's ``computeIoU``: the intersection spans pixels
    ``max(x) .. min(x + w - 1)`` and counts only when that span is longer than one pixel in both directions (its
    strict ``<``), so boxes that share a single pixel column or row have IoU 0. ``inclusive=False`` is the usual
    continuous-coordinate IoU.
    """
    ax, ay, aw, ah = (float(v) for v in a[:4])
    bx, by, bw, bh = (float(v) for v in b[:4])
    if inclusive:
        x1, y1 = max(ax, bx), max(ay, by)
        x2, y2 = min(ax + aw - 1, bx + bw - 1), min(ay + ah - 1, by + bh - 1)
        inter = (x2 - x1 + 1) * (y2 - y1 + 1) if (x1 < x2 and y1 < y2) else 0.0
    else:
        iw = min(ax + aw, bx + bw) - max(ax, bx)
        ih = min(ay + ah, by + bh) - max(ay, by)
        inter = max(0.0, iw) * max(0.0, ih)
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def upsample_map(grid: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A ``[h, w]`` patch-grid map -> ``[height, width]`` (bicubic, corners not aligned, as ALBEF)."""
    return F.interpolate(grid[None, None].float(), size=(height, width), mode="bicubic", align_corners=False)[0, 0]


def box_scores(heat: torch.Tensor, proposals: Sequence[Box], alpha: float = 0.5) -> torch.Tensor:
    """Score of each ``[x, y, w, h]`` proposal on a full-resolution ``[H, W]`` map: mass in the box / area**alpha.

    Coordinates are truncated to integers (ALBEF); a box of zero width or height scores ``-inf``.
    """
    out = torch.empty(len(proposals))
    for i, box in enumerate(proposals):
        x, y, w, h = (int(v) for v in box[:4])
        x, y = max(0, x), max(0, y)
        if w <= 0 or h <= 0:
            out[i] = float("-inf")
            continue
        out[i] = heat[y : y + h, x : x + w].sum() / float(w * h) ** alpha
    return out


def best_box(scores: torch.Tensor) -> int:
    """Index of the best proposal (first on ties); ``-1`` when there is none."""
    if scores.numel() == 0:
        return -1
    best, index = float("-inf"), 0  # reset per expression (ALBEF's grounding_eval keeps the previous box)
    for i, s in enumerate(scores.tolist()):
        if s > best:
            best, index = s, i
    return index


def gradcam_map(
    attention: torch.Tensor, gradient: torch.Tensor, text_mask: torch.Tensor, grid: tuple[int, int], prefix: int = 1
) -> torch.Tensor:
    """Grad-CAM over image patches from text->image attention: ``[B, h, w]``.

    ``attention`` / ``gradient``: ``[B, heads, L_text, prefix + h*w]`` (probabilities and the gradient of the score
    with respect to them); the first ``prefix`` columns (the image [CLS]) are dropped; gradients are clamped at 0;
    padded text rows are zeroed by ``text_mask`` ``[B, L_text]``; the map is the mean over heads, then over text
    positions, of ``attention * relu(gradient)`` (ALBEF's ``getAttMap`` input).
    """
    bsz = attention.shape[0]
    h, w = grid
    att = attention[..., prefix:].float()
    grad = gradient[..., prefix:].float().clamp_min(0)
    if att.shape[-1] != h * w:
        raise ValueError(f"gradcam_map: {att.shape[-1]} image columns do not form a {h}x{w} grid")
    mask = text_mask.to(att.device, att.dtype)[:, None, :, None]
    cam = att * grad * mask
    return cam.mean(dim=1).mean(dim=1).reshape(bsz, h, w)
