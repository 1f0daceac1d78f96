"""The contracts of the training engine: what a model must and may provide, and what a batch augmentation is.

The engine (:mod:`pretrain.engine`) trains any ``nn.Module`` that satisfies :class:`TrainableModel`; each optional
capability is its own runtime-checkable protocol, and the engine calls a hook only when the model implements it
(``isinstance(model, StepState)``), never by probing names. A model states its capabilities by defining the
methods; no base class is needed.

Batch augmentation is passed to the engine as a callable (as timm passes ``mixup_fn``), so the engine reads no
augmentation config: see :class:`BatchAugment` and :class:`pretrain.mixgen.BatchMixGen`.

The batch a model receives during training is the loader's dict (``image``, ``text`` list, optional ``image2``,
``key``...) after augmentation, plus three keys the engine sets: ``step`` (optimizer updates done before this
one), ``micro`` (the index of this micro-batch within the update, counting skipped ones) and
``updates_per_epoch`` (optimizer updates per loader pass, or None when the loader does not say).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TrainableModel(Protocol):
    """Required. ``forward(batch)`` returns ``{"loss": scalar tensor, "losses": {name: detached scalar}}`` and may
    add ``logit_scale`` (logged). Every rank must run the same collectives in ``forward`` (the engine all-reduces
    the losses afterwards to agree on skipping a non-finite step)."""

    def forward(self, batch: dict[str, Any]) -> Mapping[str, Any]: ...


@runtime_checkable
class StepState(Protocol):
    """Optional: state a training forward produces outside the parameters (ALBEF/TCL feature queues).

    ``commit_step()`` applies the state changes of the last training forward (e.g. enqueue momentum features; may
    be a collective); the engine calls it on every rank once the micro-batch's losses are agreed finite, and
    ``discard_step()`` instead when the batch is skipped, so a non-finite batch never reaches model state."""

    def commit_step(self) -> None: ...

    def discard_step(self) -> None: ...


@runtime_checkable
class AfterOptimizerStep(Protocol):
    """Optional: runs after each optimizer update (temperature clamp, momentum EMA), never after a skipped batch."""

    def after_optimizer_step(self) -> None: ...


@runtime_checkable
class WeightDecayExempt(Protocol):
    """Optional: parameter names that get no weight decay besides biases, norms and 1-D parameters."""

    def no_weight_decay(self) -> set[str]: ...


@runtime_checkable
class HasMomentum(Protocol):
    """Optional: ``has_momentum = True`` marks EMA twins that read full parameters (the engine refuses ZeRO-3)."""

    has_momentum: bool


@runtime_checkable
class ConfigAware(Protocol):
    """Optional: reads/validates recipe keys beyond the model's own section before DeepSpeed starts (raises
    :class:`launch.config.ConfigError`)."""

    def configure(self, cfg: Any) -> None: ...


@runtime_checkable
class ImageLogging(Protocol):
    """Optional: image grids for TensorBoard, polled after every step (``{tag: [N, 3, H, W] in [0, 1]}``)."""

    def images_to_log(self) -> dict[str, torch.Tensor] | None: ...


@runtime_checkable
class TrainEnd(Protocol):
    """Optional: runs on every rank once ``train.max_steps`` is reached; its dict joins the run's summary."""

    def on_train_end(self, run_dir: Path) -> dict[str, Any] | None: ...


@runtime_checkable
class BatchAugment(Protocol):
    """A batch-level augmentation the engine applies to every training micro-batch before the forward.

    ``augment(batch, step=s, micro=m)`` returns a new batch dict; randomness must depend only on what it was
    built with (seed, rank) and on ``(step, micro)``, so a resumed run augments exactly as the uninterrupted one
    and the micro-batches of one update differ. It may add ``mixgen_rows`` (``rows``/``partners`` index tensors)
    for the engine's image log every ``image_log_every`` steps (0: never)."""

    image_log_every: int

    def __call__(self, batch: dict[str, Any], *, step: int, micro: int) -> dict[str, Any]: ...


def has_momentum(model: Any) -> bool:
    """True when ``model`` declares momentum (EMA) twins."""
    return isinstance(model, HasMomentum) and bool(model.has_momentum)
