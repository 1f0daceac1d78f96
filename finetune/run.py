"""One fine-tuning (or evaluation-only) run of a validated recipe: what ``python -m finetune`` and the
classification policy sweep both call.

Load ``model.init`` into the backbone, wrap it in the task's training module, train with the shared engine
(:class:`pretrain.engine.Trainer`: DeepSpeed, checkpoints, exact resume, TensorBoard, non-finite guard), evaluate
on val every epoch (or every ``eval.every`` steps), keep the best weights by ``eval.metric`` (:class:`BestKeeper`),
and finally evaluate them on test. ``eval.only`` evaluates ``model.init`` on ``eval.splits`` without training.
Results go to ``run.dir/results.json`` and a printed table.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from finetune.backbone import load_backbone_init
from finetune.best import BestKeeper, scalars
from finetune.config import FinetuneConfig
from launch.config import ConfigError

log = logging.getLogger("vlp.finetune")


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any] | None:
    """Fine-tune or evaluate per ``cfg`` (every rank calls it); the results dict, or None when preempted."""
    import torch.distributed as dist

    from finetune import tasks
    from launch.dist import init_distributed
    from launch.files import atomic_write_json
    from launch.rng import seed_everything
    from pretrain import models

    eval_only = bool(cfg.eval.only)
    if not eval_only and cfg.model.init in ("", "none"):
        log.warning("model.init is none: fine-tuning starts from random (or encoder-pretrained) weights")
    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    _, build = models.get(cfg.model.name)
    backbone = build(cfg.model)
    _, task_cls = tasks.get(cfg.task.name)
    heads = tuple(getattr(task_cls, "init_optional_keys", ()))
    if heads:  # a task head saved with the backbone (best.safetensors) may be absent from model.init, or present
        backbone.init_optional_keys = tuple(getattr(backbone, "init_optional_keys", ())) + heads
    # before any process group: weights of another model are a config error (InitMismatchError), not a traceback
    loaded = load_backbone_init(backbone, cfg.model.init, cfg.model.name)
    env = init_distributed()
    if env.rank == 0 and cfg.model.init not in ("", "none"):
        log.info("model.init %s: %d missing, %d unexpected keys", cfg.model.init, *map(len, loaded.values()))
    task = task_cls(cfg, env.rank, env.world_size)
    run_dir = Path(cfg.run.dir)
    results: dict[str, Any] = {"task": cfg.task.name, "model": cfg.model.name, "init": cfg.model.init}

    if eval_only:
        splits = [s for s in cfg.eval.splits if task.json_of(s)]
        if not splits:
            raise ConfigError(f"eval.splits: none of {list(cfg.eval.splits)} has an annotation file")
        run_dir.mkdir(parents=True, exist_ok=True)
        if env.rank == 0:
            from launch.config import save_config

            save_config(cfg, run_dir / "config.yaml")
        results["mode"] = "eval-only"
        import torch

        if torch.cuda.is_available():  # without the engine nobody else places the model
            backbone = backbone.cuda()
        evaluated = {s: task.evaluate(backbone, s) for s in splits}
    else:
        evaluated = _train(cfg, task, backbone, run_dir, env.rank, results)
        if evaluated is None:
            return None

    results["splits"] = {k: scalars(v) for k, v in evaluated.items()}
    if env.rank == 0:
        for split in evaluated:
            for path in task.report(evaluated[split], split, run_dir):
                results.setdefault("figures", []).append(str(path))
        atomic_write_json(run_dir / "results.json", results)
        print(task.table(results["splits"]))
        print(f"results: {run_dir / 'results.json'}")
    if dist.is_initialized():
        dist.barrier()
    return results


def _train(cfg: FinetuneConfig, task: Any, backbone: Any, run_dir: Path, rank: int, results: dict[str, Any]):
    """Train with model selection on val (test when there is no val); the evaluated splits, None when preempted."""
    from pretrain.engine import Trainer

    run_dir.mkdir(parents=True, exist_ok=True)
    results["mode"] = "finetune"
    model = task.build_model(backbone)
    loader = task.train_loader()
    select = "val" if task.json_of("val") else "test"
    if select == "test" and rank == 0:
        log.warning("no val split: the best checkpoint is selected on test (report it as such)")
    keeper = BestKeeper(run_dir, cfg.eval.metric, rank, dataclasses.asdict(cfg.model))

    def evaluate(module: Any, step: int) -> dict[str, Any]:
        metrics = task.evaluate(module.backbone, select)
        keeper.offer(step, metrics, module.backbone)
        return scalars(metrics)

    every = cfg.eval.every or loader.steps_per_epoch
    groups_fn = getattr(task, "param_groups", None)  # optional: e.g. a new head at a multiple of the learning rate
    groups = groups_fn(model) if callable(groups_fn) else None
    from pretrain.mixgen import build_mixgen

    augment = build_mixgen(cfg.mixgen, seed=cfg.run.seed, rank=rank)  # off unless the recipe enables it
    trainer = Trainer(cfg, model, loader, augment=augment, evaluate=evaluate, eval_every=every, groups=groups)
    summary = trainer.fit()
    if summary.get("preempted"):
        log.warning("preempted: no final test evaluation; rerun the same command to resume")
        return None
    results["train"] = {k: summary.get(k) for k in ("steps", "seconds", "samples_per_s", "first_loss", "last_loss")}
    backbone = trainer.module.backbone
    if keeper.path.is_file():
        load_backbone_init(backbone, str(keeper.path))
        results["best"] = keeper.record
    evaluated = {f"{select}_best": keeper.record["metrics"]} if keeper.record else {}
    if select != "test" and task.json_of("test"):
        evaluated["test"] = task.evaluate(backbone, "test")
    return evaluated
