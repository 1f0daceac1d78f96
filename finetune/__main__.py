"""``torchrun -m finetune --config configs/finetune/<task>.yaml [--eval-only] [key=value ...]``.

Fine-tuning: load ``model.init`` (a pretrain or fine-tune ``run.dir``'s latest checkpoint, or a safetensors export),
wrap it in the task's training module, train with the shared engine (:class:`pretrain.engine.Trainer`: DeepSpeed,
checkpoints, exact resume, TensorBoard, non-finite guard), evaluate on val every epoch (or every ``eval.every``
steps), keep the best weights by ``eval.metric`` in ``run.dir/best.safetensors``, and finally evaluate them on
test. ``--eval-only`` evaluates ``model.init`` on ``eval.splits`` without training (zero-shot protocols).
Results go to ``run.dir/results.json`` and a printed table. A configuration error is one line on stderr and exit
status 2, before any distributed setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from launch.config import ConfigError, load_config
from launch.logging import announce_run_folder, report_config_error, setup_logging

log = logging.getLogger("vlp.finetune")

BEST = "best.safetensors"
BACKBONE_PREFIX = "backbone."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune or evaluate a pretrained model.",
        epilog="recipe keys: docs/finetune.md (task.*, eval.*); shared keys: docs/pretrain.md, docs/models.md",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/finetune/retrieval_synthetic.yaml")
    parser.add_argument("--eval-only", action="store_true", help="evaluate model.init on eval.splits; no training")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    return parser.parse_intermixed_args(argv)


def load_config_checked(path: str, overrides: list[str], eval_only: bool) -> Any:
    """The validated recipe; raises :class:`ConfigError` for anything wrong that is knowable before work starts."""
    from finetune.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, path, overrides)
    init = cfg.model.init
    if init not in ("", "none") and not Path(init).exists():
        raise ConfigError(f"model.init: path does not exist: {init}")
    if not eval_only:
        if init in ("", "none"):
            log.warning("model.init is none: fine-tuning starts from random (or encoder-pretrained) weights")
        check = getattr(cfg.task, "check_training", None)
        if callable(check):
            check()
    return cfg


def load_backbone_init(model: Any, init: str | None, model_name: str | None = None) -> dict[str, list[str]]:
    """Load ``init`` into ``model``; a fine-tune run's weights (``backbone.``-prefixed) load as well.

    Every key must match both ways (:func:`pretrain.export.check_init_keys`; a model may declare
    ``init_optional_keys`` prefixes): weights of another model are an error before any is copied.
    """
    import torch

    from pretrain.export import InitMismatchError, check_init_keys, init_source, load_state

    if init in (None, "", "none"):
        return {"missing": [], "unexpected": []}
    state = load_state(init)
    if state and all(k.startswith(BACKBONE_PREFIX) for k in state):
        state = {k[len(BACKBONE_PREFIX) :]: v for k, v in state.items()}
    own = model.state_dict()
    name = model_name or type(model).__name__
    check_init_keys(name, init, list(state), list(own), tuple(getattr(model, "init_optional_keys", ())))
    shared = [k for k in state if k in own]
    bad = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shared if state[k].shape != own[k].shape]
    if bad:
        source, where = init_source(init)
        raise InitMismatchError(
            f"model.init: {init} does not match model {name!r}: shape mismatch for {len(bad)} weights, e.g. "
            f"{bad[:3]}; the checkpoint was trained as {source!r} ({where}): same model, other size settings?"
        )
    with torch.no_grad():
        result = model.load_state_dict(state, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class BestKeeper:
    """Tracks the best validation metric and writes those weights to ``run.dir/best.safetensors`` (rank 0).

    The record ``run.dir/best.json`` survives a restart, so a resumed run only replaces a better checkpoint.
    """

    def __init__(self, run_dir: Path, metric: str, rank: int, model_meta: dict[str, Any]) -> None:
        self.run_dir, self.metric, self.rank, self.meta = run_dir, metric, rank, model_meta
        self.record_path = run_dir / "best.json"
        self.record: dict[str, Any] | None = None
        if self.record_path.is_file():
            self.record = json.loads(self.record_path.read_text())

    def offer(self, step: int, metrics: dict[str, Any], module: Any) -> bool:
        if self.metric not in metrics:
            raise KeyError(f"eval.metric: {self.metric!r} is not among the task's metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.record is not None and value <= float(self.record["value"]):
            return False
        self.record = {"step": step, "metric": self.metric, "value": value, "metrics": _scalars(metrics)}
        if self.rank == 0:
            from launch.checkpoint import atomic_write_json
            from pretrain.export import export_safetensors

            export_safetensors(module.state_dict(), self.run_dir / BEST, {"model": self.meta, **self.record})
            atomic_write_json(self.record_path, self.record)
        return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["analyze"]:  # python -m finetune analyze <run> [<other run>]: finetune/analyze.py
        from finetune.analyze import main as analyze

        return analyze(argv[1:])
    args = parse_args(argv)
    try:
        cfg = load_config_checked(args.config, args.overrides, args.eval_only)
        if not args.eval_only:
            from launch.dist import detect_env
            from pretrain.engine import check_resume

            check_resume(cfg, detect_env().world_size)  # before any process group or model exists
    except ConfigError as exc:
        return report_config_error(exc)
    announce_run_folder(cfg.run.dir)
    setup_logging()
    from pretrain.__main__ import _quiet_libraries

    _quiet_libraries()

    import torch.distributed as dist

    from finetune import tasks
    from finetune.tasks.retrieval import table
    from launch.checkpoint import atomic_write_json, seed_everything
    from launch.config import save_config
    from pretrain import models
    from pretrain.engine import Trainer, init_distributed
    from pretrain.export import InitMismatchError

    seed_everything(cfg.run.seed)  # identical initial weights on every rank
    _, build = models.get(cfg.model.name)
    backbone = build(cfg.model)
    _, task_cls = tasks.get(cfg.task.name)
    heads = tuple(getattr(task_cls, "init_optional_keys", ()))
    if heads:  # a task head saved with the backbone (best.safetensors) may be absent from model.init, or present
        backbone.init_optional_keys = tuple(getattr(backbone, "init_optional_keys", ())) + heads
    try:  # before any process group: weights of another model are a config error, not a traceback per rank
        loaded = load_backbone_init(backbone, cfg.model.init, cfg.model.name)
    except InitMismatchError as exc:
        return report_config_error(exc)
    env = init_distributed()
    if env.rank == 0 and cfg.model.init not in ("", "none"):
        log.info("model.init %s: %d missing, %d unexpected keys", cfg.model.init, *map(len, loaded.values()))
    _, task_cls = tasks.get(cfg.task.name)
    task = task_cls(cfg, env.rank, env.world_size)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model_meta = dataclasses.asdict(cfg.model)
    results: dict[str, Any] = {"task": cfg.task.name, "model": cfg.model.name, "init": cfg.model.init}

    if args.eval_only:
        if env.rank == 0:
            save_config(cfg, run_dir / "config.yaml")
        results["mode"] = "eval-only"
        splits = [s for s in cfg.eval.splits if task.json_of(s)]
        if not splits:
            print(f"config error: none of eval.splits {list(cfg.eval.splits)} has an annotation file", file=sys.stderr)
            return 2
        import torch

        if torch.cuda.is_available():  # without the engine nobody else places the model
            backbone = backbone.cuda()
        evaluated = {s: task.evaluate(backbone, s) for s in splits}
    else:
        results["mode"] = "finetune"
        model = task.build_model(backbone)
        loader = task.train_loader()
        select = "val" if task.json_of("val") else "test"
        if select == "test" and env.rank == 0:
            log.warning("no val split: the best checkpoint is selected on test (report it as such)")
        keeper = BestKeeper(run_dir, cfg.eval.metric, env.rank, model_meta)

        def evaluate(module: Any, step: int) -> dict[str, Any]:
            metrics = task.evaluate(module.backbone, select)
            keeper.offer(step, metrics, module.backbone)
            return _scalars(metrics)

        every = cfg.eval.every or loader.steps_per_epoch
        from pretrain.mixgen import build_mixgen

        augment = build_mixgen(cfg.mixgen, seed=cfg.run.seed, rank=env.rank)  # off unless the recipe enables it
        groups_fn = getattr(task, "param_groups", None)  # e.g. a head at a multiple of the learning rate
        groups = groups_fn(model) if callable(groups_fn) else None
        trainer = Trainer(cfg, model, loader, augment=augment, evaluate=evaluate, eval_every=every, groups=groups)
        summary = trainer.fit()
        if summary.get("preempted"):
            log.warning("preempted: no final test evaluation; rerun the same command to resume")
            return 0
        results["train"] = {k: summary.get(k) for k in ("steps", "seconds", "samples_per_s", "first_loss", "last_loss")}
        backbone = trainer.module.backbone
        if (run_dir / BEST).is_file():
            load_backbone_init(backbone, str(run_dir / BEST))
            results["best"] = keeper.record
        evaluated = {f"{select}_best": keeper.record["metrics"]} if keeper.record else {}
        if select != "test" and task.json_of("test"):
            evaluated["test"] = task.evaluate(backbone, "test")

    results["splits"] = {k: _scalars(v) for k, v in evaluated.items()}
    if env.rank == 0:
        for split in evaluated:
            for path in task.report(evaluated[split], split, run_dir):
                results.setdefault("figures", []).append(str(path))
        atomic_write_json(run_dir / "results.json", results)
        task_table = getattr(task, "table", None)  # tasks with other metrics print their own table
        print(task_table(results["splits"]) if callable(task_table) else table(results["splits"], cfg.eval.ks))
        print(f"results: {run_dir / 'results.json'}")
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
