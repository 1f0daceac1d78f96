"""Loading ``model.init`` into a fine-tuning backbone (a pretrain run, a safetensors export, or a fine-tune run)."""

from __future__ import annotations

from typing import Any

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
