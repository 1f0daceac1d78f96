"""The model contract, for every registered model: a new model is tested here by registering it (and shipping
its ``configs/pretrain/<name>_tiny.yaml``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import REPO

from launch.config import load_config
from pretrain import models
from pretrain.config import PretrainConfig

# registered models without a tiny image-text recipe, and where they are tested instead
NOT_IMAGE_TEXT = {"style_transfer": "tests/test_style_transfer.py (needs a folder of style images)"}


def _tiny_recipe(name: str) -> Path:
    return REPO / "configs" / "pretrain" / f"{name}_tiny.yaml"


@pytest.mark.parametrize("name", [n for n in models.names() if n not in NOT_IMAGE_TEXT])
def test_registered_model_follows_the_pretraining_contract(name):
    assert _tiny_recipe(name).is_file(), f"model {name!r} is registered but has no {_tiny_recipe(name).name}"
    cfg = load_config(PretrainConfig, _tiny_recipe(name), check_paths=False)
    assert cfg.model.name == name
    torch.manual_seed(0)
    _, build = models.get(name)
    model = build(cfg.model)
    size = cfg.data.image_size
    batch = {
        "image": torch.randn(4, 3, size, size),
        "text": ["a red square on grass", "two dogs", "a blue circle", "a cat on a mat"],  # a list: MixGen's input
        "step": 0,
        "steps_per_epoch": 10,
    }
    if cfg.data.views == 2:
        batch["image2"] = torch.randn(4, 3, size, size)
    out = model(batch)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    assert out["losses"] and all(torch.isfinite(torch.as_tensor(v)) for v in out["losses"].values())
    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert set(model(batch)["losses"]) == set(out["losses"])  # the same objectives every step (one all-reduce)
