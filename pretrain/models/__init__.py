"""Model registry: one file per model, each registering ``build(opts) -> nn.Module`` and its options schema.

A model file calls :func:`register` at import time; :func:`get` imports ``pretrain.models.<name>`` on demand, so
adding a model means adding one file (and a recipe).
"""

from __future__ import annotations

import dataclasses

from launch.registry import Registry

_MODELS = Registry("model", "pretrain.models", known=("clip", "vilt", "albef", "tcl", "style_transfer"))
register = _MODELS.register  # decorator: @register("name", Options) on ``build(options) -> nn.Module``
get = _MODELS.get  # name -> (options dataclass, build function)
names = _MODELS.names


@dataclasses.dataclass
class ModelOptions:
    """Keys every model understands; each model subclasses this with its own options."""

    name: str = "clip"
    init: str = "none"  # a pretrain run.dir (its latest checkpoint), a .safetensors export, or none
