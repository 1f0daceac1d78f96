"""``python -m pretrain --config configs/pretrain/clip_tiny.yaml [key=value ...]``.

Runs the same way as one plain process, under ``torchrun --nproc_per_node N -m pretrain ...``, under the
``deepspeed`` launcher (its ``--local_rank`` argument is accepted and ignored: the rank comes from the
environment). A configuration error is printed as one line and exits with status 2
before any distributed setup.
"""

from __future__ import annotations

import argparse
import json

from launch.config import ConfigError, exits_on_config_error
from launch.dist import exit_entry
from launch.logging import announce_run_folder, quiet_libraries, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Pretrain a vision-language model.",
        epilog="recipe keys: docs/pretrain.md (engine, train.*, data.*), docs/models.md (model.*), docs/mixgen.md",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/pretrain/clip_tiny.yaml")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    return parser.parse_intermixed_args(argv)


@exits_on_config_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pretrain.config import load_pretrain_config

    cfg = load_pretrain_config(args.config, args.overrides)
    if not cfg.data.shards:
        raise ConfigError("data.shards: required (a path, glob or brace pattern of .tar shards)")
    announce_run_folder(cfg.run.dir)
    log = setup_logging()
    quiet_libraries()

    from launch.dist import detect_env, init_distributed
    from launch.rng import seed_everything
    from pretrain import models
    from pretrain.data import ShardLoader
    from pretrain.engine import Trainer, check_resume
    from pretrain.export import load_init
    from pretrain.mixgen import build_mixgen

    check_resume(cfg, detect_env().world_size)  # before any process group or model exists
    seed_everything(cfg.run.seed)  # same seed on every rank: identical initial weights before DeepSpeed's broadcast
    _, build = models.get(cfg.model.name)
    model = build(cfg.model)
    env = init_distributed()
    loaded = load_init(model, cfg.model.init)
    if cfg.model.init not in ("", "none") and env.rank == 0:
        log.info("model.init %s: %d missing, %d unexpected keys", cfg.model.init, *map(len, loaded.values()))
    loader = ShardLoader(cfg.data, seed=cfg.run.seed, rank=env.rank, world_size=env.world_size, train=True)
    augment = build_mixgen(cfg.mixgen, seed=cfg.run.seed, rank=env.rank)
    summary = Trainer(cfg, model, loader, augment=augment).fit()
    if env.rank == 0:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    exit_entry(main)
