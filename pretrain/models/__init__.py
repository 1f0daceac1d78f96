"""Model registry: one file per model, each registering ``build(opts) -> nn.Module`` and its options schema.

A model file calls :func:`register` at import time; :func:`get` imports ``pretrain.models.<name>`` on demand, so
adding a model means adding one file (and a recipe).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

from torch import nn

_REGISTRY: dict[str, tuple[type, Callable[[Any], nn.Module]]] = {}

# model name -> module that defines it (module names that differ from the model name)
_MODULES = {"style_transfer": "style_transfer"}
KNOWN = ("clip", "vilt", "albef", "tcl", "style_transfer")


def register(name: str, options: type) -> Callable[[Callable[[Any], nn.Module]], Callable[[Any], nn.Module]]:
    """Decorator: register ``build(options_instance)`` under ``name`` with its options dataclass."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options for model {name!r} must be a dataclass")

    def wrap(fn: Callable[[Any], nn.Module]) -> Callable[[Any], nn.Module]:
        _REGISTRY[name] = (options, fn)
        return fn

    return wrap


def get(name: str) -> tuple[type, Callable[[Any], nn.Module]]:
    """The (options dataclass, build function) of model ``name``."""
    if name not in _REGISTRY:
        module = _MODULES.get(name, name)
        try:
            importlib.import_module(f"pretrain.models.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pretrain.models.{module}":
                raise
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(KNOWN), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown model '{name}'{hint}; known: {', '.join(KNOWN)}")
    return _REGISTRY[name]


def names() -> list[str]:
    return list(KNOWN)


@dataclasses.dataclass
class ModelOptions:
    """Keys every model understands; each model subclasses this with its own options."""

    name: str = "clip"
    init: str = "none"  # a pretrain run.dir (its latest checkpoint), a .safetensors export, or none
