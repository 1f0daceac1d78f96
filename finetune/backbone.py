"""Loading ``model.init`` into a fine-tuning backbone (a pretrain run, a safetensors export, or a fine-tune run)."""

from __future__ import annotations

from typing import Any

BACKBONE_PREFIX = "backbone."  # a fine-tune run's weights are its training module's, the backbone under this prefix


def load_backbone_init(model: Any, init: str | None) -> dict[str, list[str]]:
    """Load ``init`` into ``model``; a fine-tune run's weights (``backbone.``-prefixed) load as well.

    Returns the ``missing`` and ``unexpected`` key lists; no shared key, or a shape mismatch, is a ValueError.
    """
    import torch

    from pretrain.export import load_state

    if init in (None, "", "none"):
        return {"missing": [], "unexpected": []}
    state = load_state(init)
    if state and all(k.startswith(BACKBONE_PREFIX) for k in state):
        state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items()}
    own = model.state_dict()
    shared = [k for k in state if k in own]
    if not shared:
        raise ValueError(f"model.init: no weight in {init} matches model '{type(model).__name__}'")
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"model.init: shape mismatch for {len(bad)} weights, e.g. {bad[:3]}")
    with torch.no_grad():
        result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}
