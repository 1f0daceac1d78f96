"""Loading ``model.init`` into a fine-tuning backbone (a pretrain run, a safetensors export, or a fine-tune run)."""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

BACKBONE_PREFIX = "backbone."  # a fine-tune run's weights are its training module's, the backbone under this prefix


def load_backbone_init(model: Any, init: str | None, model_name: str | None = None) -> dict[str, list[str]]:
    """Load ``init`` into ``model``; a fine-tune run's weights (``backbone.``-prefixed) load as well.

    Every key must match both ways (:func:`pretrain.export.check_init_keys`; a model may declare
    ``init_optional_keys`` prefixes): weights of another model are an error before any is copied. Returns the
    ``missing`` and ``unexpected`` key lists.
    """
    import torch

    from pretrain.export import InitMismatchError, check_init_keys, init_source, load_state

    if init in (None, "", "none"):
        return {"missing": [], "unexpected": []}
    state = load_state(init)
    if state and all(k.startswith(BACKBONE_PREFIX) for k in state):
        state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items()}
    own = model.state_dict()
    name = model_name or type(model).__name__
    check_init_keys(name, init, list(state), list(own), tuple(getattr(model, "init_optional_keys", ())))
    shared = [k for k in state if k in own]
    for k in shared:
        if k.endswith("pos_embed") and state[k].shape != own[k].shape:
            state[k] = resample_pos_embed(state[k], tuple(own[k].shape), k)
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared if state[k].shape != own[k].shape]
    if bad:
        source, where = init_source(init)
        raise InitMismatchError(
            f"model.init: {init} does not match model {name!r}: shape mismatch for {len(bad)} weights, e.g. "
            f"{bad[:3]}; the checkpoint was trained as {source!r} ({where}): same model, other size settings?"
        )
    with torch.no_grad():
        result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def _grid_split(tokens: int, other: int) -> tuple[int, int] | None:
    """(prefix tokens, grid side) such that ``tokens`` = prefix + side² and ``other`` - prefix is a square too."""
    for prefix in range(0, 9):
        side, other_side = math.isqrt(max(tokens - prefix, 0)), math.isqrt(max(other - prefix, 0))
        if side > 0 and other_side > 0 and side * side == tokens - prefix and other_side**2 == other - prefix:
            return prefix, side
    return None


def resample_pos_embed(pos: Any, shape: tuple[int, ...], key: str = "pos_embed") -> Any:
    """A ViT's absolute position embedding ``[1, prefix + s², D]`` resampled to ``shape`` (another square grid, same
    prefix tokens and width): bicubic on the grid, prefix ([CLS]) tokens kept. This is how ALBEF fine-tunes a 256 px
    pretraining at 384 px (its ``interpolate_pos_embed``). Other shape changes are returned unchanged (and then
    reported as a mismatch)."""
    from timm.layers import resample_abs_pos_embed

    if pos.dim() != 3 or len(shape) != 3 or pos.shape[0] != shape[0] or pos.shape[2] != shape[2]:
        return pos
    split = _grid_split(pos.shape[1], shape[1])
    if split is None:
        return pos
    prefix, side = split
    new_side = math.isqrt(shape[1] - prefix)
    out = resample_abs_pos_embed(pos.float(), [new_side, new_side], [side, side], num_prefix_tokens=prefix,
                                 interpolation="bicubic", antialias=False)  # fmt: skip
    log.info("model.init: %s resampled from a %dx%d to a %dx%d patch grid (bicubic; image size changed)",
             key, side, side, new_side, new_side)  # fmt: skip
    return out.to(pos.dtype)
