"""The fine-tuning recipe schema: the pretrain sections plus ``task`` (resolved by the task registry) and ``eval``.

``task`` is a mapping whose ``name`` picks a registered task; the task's options dataclass validates the other keys
(as ``model`` is validated by the model registry). MixGen is off in fine-tuning unless a recipe turns it on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from finetune import tasks
from launch.config import ConfigError, deep_merge, load_config, resolve_named_options
from launch.recipes import register as register_recipe
from pretrain.config import MixGenConfig, PretrainConfig


def _mixgen_off() -> MixGenConfig:
    return MixGenConfig(enabled=False)


@dataclasses.dataclass
class EvalConfig:
    """Evaluation options shared by the tasks (retrieval reads all of them)."""

    every: int = 0  # steps between validation runs; 0: once per epoch of the training loader
    metric: str = "r_mean"  # the key of the task's metrics that picks the best checkpoint (higher is better)
    batch_size: int = 64  # images/texts encoded per forward
    num_workers: int = 0  # image decoding workers for evaluation
    k_test: int = 128  # fusion models: ITM re-ranks the ITC top-k (ALBEF: 256 COCO, 128 Flickr)
    score: Literal["itm", "itm+itc"] = "itm"  # fusion re-rank score: ALBEF's ITM logit, or LAVIS's ITM + ITC sim
    rerank_batch: int = 128  # image-text pairs per fusion forward
    block: int = 256  # query rows per block of the blockwise similarity computation
    ks: tuple[int, ...] = (1, 5, 10)
    full_itm_max_pairs: int = 250_000  # ViLT (no ITC) scores every pair with ITM; refuse larger test sets
    qualitative: int = 4  # text queries in the qualitative PNG (0: none)
    splits: tuple[str, ...] = ("val", "test")  # splits --eval-only evaluates
    only: bool = False  # evaluate model.init on eval.splits without training (what --eval-only sets)

    def validate(self, recipe: Any) -> None:
        if self.every < 0:
            raise ConfigError("eval.every: must be >= 0 (0: once per epoch)")
        for key in ("batch_size", "k_test", "rerank_batch", "block", "full_itm_max_pairs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key}: must be >= 1")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError("eval.ks: a non-empty list of positive ranks")
        if self.k_test < max(self.ks):
            raise ConfigError(f"eval.k_test: {self.k_test} is below the largest recall rank {max(self.ks)}")
        bad = [s for s in self.splits if s not in ("train", "val", "test")]
        if bad:
            raise ConfigError(f"eval.splits: unknown split {bad[0]!r} (train, val, test)")


@dataclasses.dataclass
class FinetuneConfig(PretrainConfig):
    """``run``/``data``/``model``/``mixgen``/``train``/``deepspeed`` as in pretraining, plus ``task`` and ``eval``."""

    mixgen: MixGenConfig = dataclasses.field(default_factory=_mixgen_off)
    task: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "retrieval"})
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    @staticmethod
    def prepare_tree(tree: dict[str, Any]) -> dict[str, Any]:
        """Fill what the recipe leaves out from the pretrain run it starts from (``model.init``): every model key,
        and the image normalization ``data.mean``/``data.std``.

        The pretrain engine saves its resolved recipe as ``run.dir/config.yaml``; taking the architecture from there
        means the fine-tuned network is the one that was trained. A mismatch would load without error and quietly
        cost accuracy (text pooling ``cls`` vs ``mean`` cost 180 RSUM points in the synthetic demo; an ImageNet
        tower evaluated with the CLIP statistics sees inputs scaled ~15 % differently). Keys the recipe or a
        command-line override sets win; a run of another model name, or an init that is not a run folder (a
        safetensors export), lends nothing. A checkpoint folder of a run (``run.dir/checkpoints`` or a tag such as
        ``run.dir/checkpoints/step400``, to evaluate an intermediate step) counts as that run.
        """
        model = tree.get("model")
        run = _init_run_config(model)
        if not run:
            return tree
        tree["model"] = deep_merge(run["model"], model)
        run_data, data = run.get("data"), tree.setdefault("data", {})
        if isinstance(run_data, dict) and isinstance(data, dict):
            for key in ("mean", "std"):
                if key not in data and key in run_data:
                    data[key] = run_data[key]
        return tree

    def validate(self, recipe: Any) -> None:
        super().validate(recipe)
        if int(self.deepspeed.zero_stage) == 3:
            raise ConfigError(
                "deepspeed.zero_stage: fine-tuning keeps the best weights from the full module state, which ZeRO-3 "
                "partitions; use stage 0, 1 or 2"
            )
        self.task = resolve_named_options("task", self.task, tasks.get, tasks.names())


@register_recipe("finetune", FinetuneConfig)
def load_finetune_config(path: str | Path, overrides: Sequence[str] = (), eval_only: bool = False) -> FinetuneConfig:
    """The validated fine-tuning recipe (``eval_only``: what ``--eval-only`` sets, ``eval.only=true``)."""
    extra = ["eval.only=true"] if eval_only else []
    cfg = load_config(FinetuneConfig, path, [*overrides, *extra])
    init = cfg.model.init
    if init not in ("", "none") and not Path(init).exists():
        raise ConfigError(f"model.init: path does not exist: {init}")
    if not cfg.eval.only and hasattr(cfg.task, "train_json") and not cfg.task.train_json:
        raise ConfigError("task.train_json: required for fine-tuning (or pass --eval-only)")
    return cfg


def _init_run_config(model: Any) -> dict[str, Any]:
    """The saved recipe of the pretrain run ``model.init`` points into, or {} when there is none or it trained
    another model (a run of another architecture lends nothing to this network)."""
    init = model.get("init") if isinstance(model, dict) else None
    if not isinstance(init, str) or init in ("", "none"):
        return {}
    from pretrain.export import run_config_file

    saved = run_config_file(init)
    if saved is None:
        return {}
    try:
        run = yaml.safe_load(saved.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"model.init: {saved} is not valid YAML: {exc}") from exc
    base = run.get("model") if isinstance(run, dict) else None
    if not isinstance(base, dict) or base.get("name") != model.get("name", base.get("name")):
        return {}
    return run
