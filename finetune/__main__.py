"""``torchrun -m finetune --config configs/finetune/<task>.yaml [--eval-only] [key=value ...]``.

Fine-tuning (or, with ``--eval-only``, evaluation of ``model.init`` on ``eval.splits``): see
:mod:`finetune.run`. ``python -m finetune analyze <run> [<other run>]``: :mod:`finetune.analyze`. A configuration
error is one line on stderr and exit status 2, before any distributed setup.
"""

from __future__ import annotations

import argparse
import sys

from launch.config import exits_on_config_error
from launch.dist import exit_entry
from launch.logging import announce_run_folder, quiet_libraries, report_config_error, setup_logging


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune or evaluate a pretrained model.",
        epilog="recipe keys: docs/finetune.md (task.*, eval.*); shared keys: docs/pretrain.md, docs/models.md",
    )
    parser.add_argument("--config", required=True, help="YAML recipe, e.g. configs/finetune/retrieval_synthetic.yaml")
    parser.add_argument("--eval-only", action="store_true", help="evaluate model.init on eval.splits (eval.only=true)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50")
    return parser.parse_intermixed_args(argv)


@exits_on_config_error
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["analyze"]:  # python -m finetune analyze <run> [<other run>]: finetune/analyze.py
        from finetune.analyze import main as analyze

        return analyze(argv[1:])
    args = parse_args(argv)
    from finetune.config import load_finetune_config

    cfg = load_finetune_config(args.config, args.overrides, eval_only=args.eval_only)
    if not args.eval_only:
        from launch.dist import detect_env
        from pretrain.engine import check_resume

        check_resume(cfg, detect_env().world_size)  # before any process group or model exists
    announce_run_folder(cfg.run.dir)
    setup_logging()
    quiet_libraries()
    from finetune.run import run_finetune
    from pretrain.export import InitMismatchError

    try:
        run_finetune(cfg)
    except InitMismatchError as exc:  # weights of another model: found before any process group starts
        return report_config_error(exc)
    return 0


if __name__ == "__main__":
    exit_entry(main)
