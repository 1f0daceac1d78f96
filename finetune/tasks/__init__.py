"""Fine-tuning task registry: one file per task, each registering its options dataclass and task class.

A task file calls :func:`register` at import time; :func:`get` imports ``finetune.tasks.<name>`` on demand, so
adding a task means adding one file (and a recipe under ``configs/finetune/``). A task class implements

* ``__init__(cfg, rank, world)``: read ``cfg.task`` (its options) and ``cfg.eval``;
* ``build_model(backbone) -> nn.Module``: the training module (``model(batch)`` -> ``{"loss", "losses"}``) whose
  ``backbone`` attribute is the pretrained model;
* ``train_loader() -> iterable``: batches for the shared engine (the loader protocol of ``pretrain.engine``);
* ``evaluate(backbone, split) -> dict``: metrics on ``split`` (collective: every rank calls it);
* ``report(metrics, split, out_dir)``: optional artefacts (figures) beside ``results.json``; rank 0 only.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

_REGISTRY: dict[str, tuple[type, type]] = {}
KNOWN = ("retrieval", "classification")


@dataclasses.dataclass
class TaskOptions:
    """Keys every task understands; each task subclasses this with its own options."""

    name: str = "retrieval"


def register(name: str, options: type) -> Any:
    """Class decorator: register a task class under ``name`` with its options dataclass."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"options for task {name!r} must be a dataclass")

    def wrap(cls: type) -> type:
        _REGISTRY[name] = (options, cls)
        return cls

    return wrap


def get(name: str) -> tuple[type, type]:
    """The (options dataclass, task class) registered under ``name``."""
    if name not in _REGISTRY:
        try:
            importlib.import_module(f"finetune.tasks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"finetune.tasks.{name}":
                raise
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(KNOWN), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown task '{name}'{hint}; known: {', '.join(names())}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(set(KNOWN) | set(_REGISTRY))
