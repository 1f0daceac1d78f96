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

from launch.registry import Registry

_TASKS = Registry(
    "task", "finetune.tasks", known=("retrieval", "classification", "vqa", "entailment", "nlvr2", "grounding")
)
register = _TASKS.register  # class decorator: @register("name", Options)
get = _TASKS.get  # name -> (options dataclass, task class)
names = _TASKS.names


@dataclasses.dataclass
class TaskOptions:
    """Keys every task understands; each task subclasses this with its own options."""

    name: str = "retrieval"
