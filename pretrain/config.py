"""The pretraining recipe schema (also the base of every fine-tuning recipe)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from launch.config import ConfigError, RunConfig, resolve_named_options, shards_field

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass
class DataConfig:
    shards: str | None = shards_field(None)
    batch_size: int = 8
    num_workers: int = 2
    image_size: int = 224
    shuffle_buffer: int = 1000
    samples_per_epoch: int | None = None  # None: read from manifest.json beside the shards
    transform: Literal["albef", "tcl", "clip", "none"] = "albef"  # tcl: albef + colour jitter, grayscale, blur
    crop_scale: tuple[float, float] = (0.5, 1.0)
    randaugment: bool = False
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    max_words: int = 30
    views: int = 1  # TCL trains on two augmented views of each image

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("data.batch_size: must be >= 1")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers: must be >= 0")
        if self.views not in (1, 2):
            raise ConfigError("data.views: must be 1 or 2")


@dataclasses.dataclass
class MixGenConfig:
    enabled: bool = True
    variant: Literal["default", "a", "b", "c", "d", "e", "batch"] = "default"
    ratio: float = 0.25
    lam: float = 0.5
    image_log_every: int = 0  # steps between TensorBoard grids of mixed pairs (0: off)

    def validate(self) -> None:
        if not 0.0 < self.ratio <= 0.5 and self.variant != "batch":
            raise ConfigError("mixgen.ratio: must be in (0, 0.5] (M = ratio*B pairs mixed with the next M)")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError("mixgen.lam: must be in [0, 1]")


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 100
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    grad_accum: int = 1
    checkpoint_every: int = 50
    resume: str = "latest"  # latest | none | path to a checkpoint folder
    log_every: int = 10
    max_nonfinite: int = 5  # consecutive non-finite losses before stopping
    keep_checkpoints: int = 3  # newest checkpoints kept in run.dir/checkpoints
    export: bool = True  # write final weights as safetensors

    def validate(self) -> None:
        # values the schema's types allow but that would train nothing, or NaN, minutes later
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"train.lr: must be a positive number, got {self.lr}")
        if not math.isfinite(self.min_lr) or self.min_lr < 0:
            raise ConfigError(f"train.min_lr: must be >= 0, got {self.min_lr}")
        minimum = {"max_steps": 1, "grad_accum": 1, "log_every": 1, "keep_checkpoints": 1, "max_nonfinite": 1}
        minimum.update(warmup_steps=0, checkpoint_every=0)
        for key, low in minimum.items():
            if getattr(self, key) < low:
                raise ConfigError(f"train.{key}: must be >= {low}, got {getattr(self, key)}")
        for key in ("weight_decay", "grad_clip"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {value}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas: each must be in [0, 1), got {list(self.betas)}")


@dataclasses.dataclass
class DeepSpeedConfig:
    zero_stage: int = 1
    bf16: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # merged into the DeepSpeed json

    def validate(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("deepspeed.zero_stage: must be 0, 1, 2 or 3")


@dataclasses.dataclass
class PretrainConfig:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "clip"})
    mixgen: MixGenConfig = dataclasses.field(default_factory=MixGenConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = dataclasses.field(default_factory=DeepSpeedConfig)

    def validate(self) -> None:
        for section in (self.data, self.mixgen, self.train, self.deepspeed):
            section.validate()
        self.model = resolve_model_options(self.model)

    def preflight(self, world_size: int) -> None:
        """Checks that need the job's size, run by launchers before any worker starts (a resume's saved world
        size, batch size and model must match)."""
        from pretrain.engine import check_resume

        check_resume(self, world_size)


def resolve_model_options(model: Any) -> Any:
    """Turn the ``model`` mapping into the registered model's options dataclass (validating every key)."""
    from pretrain import models

    return resolve_named_options("model", model, models.get, models.names())
