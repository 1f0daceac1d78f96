"""Weights out of and into runs: the safetensors export, and ``model.init`` loading.

``model.init`` may name

* a pretrain ``run.dir``: its ``export.safetensors`` is *not* used; the newest DeepSpeed checkpoint
  (``run.dir/checkpoints/latest``) is, so a run that was stopped early still initializes a fine-tune. Only a
  run folder with no ``checkpoints/`` at all (an experiment with ``keep_checkpoints: false`` deleted them) is
  read from its ``export.safetensors``;
* a checkpoint folder (``run.dir/checkpoints`` or one tag such as ``run.dir/checkpoints/step100``);
* a ``.safetensors`` file (an export);
* ``none``.

Checkpoint files are read with ``torch.load(weights_only=True)``: initializing from someone else's run never
executes code from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from launch.files import safe_torch_load

MODEL_STATES = "mp_rank_00_model_states.pt"


def export_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write ``state`` as safetensors with ``metadata`` (values JSON-encoded) in the header, atomically."""
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage (tied embeddings); a copy of each is fine here
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tmp = p.with_name(f".{p.name}.tmp.{os.getpid()}")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, p)
    return p


def read_export(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) of an export written by :func:`export_safetensors`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata() or {}
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return load_file(str(path)), meta


def _checkpoint_tag_dir(path: Path) -> Path:
    """The tag folder holding the model states, from a run dir, a checkpoints dir, or a tag dir."""
    if (path / MODEL_STATES).is_file():
        return path
    ckpts = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    latest = ckpts / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and (ckpts / tag / MODEL_STATES).is_file():
            return ckpts / tag
    raise FileNotFoundError(
        f"model.init: {path} is neither a .safetensors export nor a run/checkpoint folder with a complete "
        f"checkpoint (looked for {MODEL_STATES} and checkpoints/latest)"
    )


def load_state(init: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model state dict named by ``init`` (see the module docstring)."""
    path = Path(init)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"model.init: export not found: {path}")
        return read_export(path)[0]
    if not path.exists():
        raise FileNotFoundError(f"model.init: path does not exist: {path}")
    if not (path / "checkpoints").exists() and (path / "export.safetensors").is_file():
        return read_export(path / "export.safetensors")[0]
    states = safe_torch_load(_checkpoint_tag_dir(path) / MODEL_STATES)
    module = states.get("module") if isinstance(states, dict) else None
    if not module:
        raise ValueError(
            f"model.init: {path} holds no module weights (a ZeRO-3 checkpoint keeps them partitioned; "
            "use the run's export.safetensors instead)"
        )
    return module


def load_init(model: nn.Module, init: str | os.PathLike | None, *, strict: bool = False) -> dict[str, list[str]]:
    """Load ``init`` into ``model`` (no-op for ``none``); returns the missing and unexpected keys.

    Non-strict by default because a fine-tuning model adds heads the pretrained one lacks; it still refuses a
    file that shares no key with the model, or whose shared keys have other shapes.
    """
    if init in (None, "", "none"):
        return {"missing": [], "unexpected": []}
    state = load_state(init)
    own = model.state_dict()
    shared = [k for k in state if k in own]
    if not shared:
        raise ValueError(
            f"model.init: no weight in {init} matches the model (file keys like {list(state)[:3]}, "
            f"model keys like {list(own)[:3]})"
        )
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared if state[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"model.init: shape mismatch for {len(bad)} weights, e.g. {bad[:3]}")
    result = model.load_state_dict(state, strict=strict)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def run_config_file(init: str | os.PathLike) -> Path | None:
    """The ``config.yaml`` of the pretraining run that ``init`` belongs to, or None.

    ``init`` may be the run folder, its ``checkpoints`` folder or one tag inside it (``checkpoints/step400``,
    to use an intermediate step); the engine saves the resolved recipe as ``run.dir/config.yaml``.
    """
    path = Path(init)
    run = path
    if path.name == "checkpoints":
        run = path.parent
    elif path.parent.name == "checkpoints":
        run = path.parent.parent
    saved = run / "config.yaml"
    return saved if saved.is_file() else None


def init_source(init: str | os.PathLike) -> tuple[str | None, str]:
    """(model name the weights at ``init`` were trained as, where that was read) or (None, why it is unknown).

    A run folder (or its checkpoints/tag folders) says it in ``config.yaml``; an export in its metadata.
    """
    import yaml

    path = Path(init)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                raw = (fh.metadata() or {}).get("model")
            model = json.loads(raw) if raw else None
        except (OSError, ValueError):
            model = None
        name = model.get("name") if isinstance(model, dict) else None
        return (name, f"{path.name} metadata") if name else (None, "the export has no model metadata")
    saved = run_config_file(path)
    if saved is None:
        return None, "no config.yaml beside the checkpoint"
    try:
        model = (yaml.safe_load(saved.read_text()) or {}).get("model")
    except yaml.YAMLError:
        model = None
    name = model.get("name") if isinstance(model, dict) else None
    return (name, str(saved)) if name else (None, f"{saved} names no model")


class InitMismatchError(ValueError):
    """``model.init`` holds weights of another architecture than the model being initialized."""


def check_init_keys(
    model_name: str,
    init: str | os.PathLike,
    state_keys: list[str],
    model_keys: list[str],
    optional: tuple[str, ...] = (),
) -> None:
    """Raise :class:`InitMismatchError` when ``init``'s keys and the model's differ beyond ``optional`` prefixes
    (the keys a task adds or drops on purpose), naming a few keys of each side and the checkpoint's own model.

    Loading what happens to match and training on is how a CLIP recipe started from an ALBEF run reached a
    retrieval score below chance with exit status 0; this is checked before any weight is copied.
    """
    have, want = set(state_keys), set(model_keys)
    missing = sorted(k for k in want - have if not k.startswith(optional))
    unexpected = sorted(k for k in have - want if not k.startswith(optional))
    if not missing and not unexpected:
        return
    source, where = init_source(init)
    belongs = f"the checkpoint belongs to model {source!r} ({where})" if source else f"its model is unknown ({where})"
    few_missing = ", ".join(missing[:3]) or "-"
    few_unexpected = ", ".join(unexpected[:3]) or "-"
    raise InitMismatchError(
        f"model.init: {init} does not match model {model_name!r}: {len(missing)} missing keys (e.g. {few_missing}), "
        f"{len(unexpected)} unexpected keys (e.g. {few_unexpected}); {belongs}. Start from a run of the same model, "
        "or set model.init=none"
    )
