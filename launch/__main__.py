"""``python -m launch local|slurm <entry> --config <recipe> [options] [key=value ...]``.

Entries are started by module name: ``pretrain``, ``finetune``, ``data_prep build``, ``data_prep style``.
``key=value`` arguments override the stage recipe; ``launch.<key>=value`` ones override the launch recipe
(``configs/launch/*.yaml``) for ``slurm``. See docs/cluster.md. ``local`` validates the recipe before torchrun
starts (a configuration error is one ``config error:`` line and exit status 2) and prints the command shell-quoted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from launch.config import ConfigError

USAGE_LOCAL = "python -m launch local <entry> --config RECIPE [--nproc N] [--dry-run] [key=value ...]"
USAGE_SLURM = """python -m launch slurm <entry> --config RECIPE [--nodes N] [--gpus-per-node G] [--tasks-per-node T]
                         [--partition P] [--time 4:00:00] [--account A] [--qos Q] [--constraint C] [--mem GB]
                         [--cpus-per-task C] [--array N] [--launch-config configs/launch/<name>.yaml]
                         [--cluster slurm|local] [--no-check] [--wait] [key=value ...] [launch.KEY=value ...]"""
DOCS = """entries: pretrain | finetune | data_prep build | data_prep style (any module run as `python -m MODULE [SUB]`)
key=value overrides go to the stage recipe (keys: docs/pretrain.md, docs/finetune.md, docs/data_prep.md,
docs/style.md); launch.KEY=value to the launch recipe (keys: docs/cluster.md)."""
USAGE = f"usage:\n  {USAGE_LOCAL}\n  {USAGE_SLURM}\n\n{DOCS}"

# command-line flag -> launch config key
_SLURM_FLAGS = {
    "nodes": int,
    "gpus_per_node": int,
    "tasks_per_node": int,
    "partition": str,
    "time": str,
    "account": str,
    "qos": str,
    "constraint": str,
    "mem": float,
    "cpus_per_task": int,
    "array": int,
    "cluster": str,
    "max_requeues": int,
    "signal_delay_s": int,
}


def _local(entry_words: list[str], rest: list[str]) -> int:
    from launch.local import parse_entry, run_local

    parser = argparse.ArgumentParser(
        prog="python -m launch local", usage=USAGE_LOCAL, epilog=DOCS, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the stage recipe (YAML)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (torchrun --nproc_per_node)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate the recipe and print the torchrun command, do not run it"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the stage recipe")
    args = parser.parse_intermixed_args(rest)
    return run_local(parse_entry(entry_words), args.config, args.overrides, nproc=args.nproc, dry_run=args.dry_run)


def _slurm(entry_words: list[str], rest: list[str], command: Sequence[str]) -> int:
    from launch.local import parse_entry
    from launch.slurm import follow_hints, load_launch_config, submit

    parser = argparse.ArgumentParser(
        prog="python -m launch slurm", usage=USAGE_SLURM, epilog=DOCS, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the stage recipe (YAML)")
    parser.add_argument("--launch-config", default=None, help="configs/launch/*.yaml")
    for flag, type_ in _SLURM_FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), dest=flag, type=type_, default=None)
    parser.add_argument("--no-check", action="store_true", help="skip validating the stage recipe before submitting")
    parser.add_argument("--wait", action="store_true", help="wait for the job(s) and print the result")
    parser.add_argument("overrides", nargs="*", help="key=value (stage recipe) and launch.KEY=value overrides")
    args = parser.parse_intermixed_args(rest)

    launch_overrides = [
        f"{'mem_gb' if flag == 'mem' else flag}={getattr(args, flag)}"
        for flag in _SLURM_FLAGS
        if getattr(args, flag) is not None
    ]
    stage_overrides = []
    for item in args.overrides:
        if item.startswith("launch."):
            launch_overrides.append(item[len("launch.") :])
        else:
            stage_overrides.append(item)
    cfg = load_launch_config(args.launch_config, launch_overrides)
    entry = parse_entry(entry_words)
    sub = submit(entry, args.config, stage_overrides, cfg, check=not args.no_check, command=command)
    ids = ", ".join(sub.job_ids)
    kind = f"array of {cfg.array}" if cfg.array else f"{cfg.nodes} node(s) x {cfg.ntasks_per_node} task(s)"
    print(f"submitted {entry.name} as job {ids} ({cfg.cluster}, {kind})")
    print(f"run folder: {sub.run_dir}   (launch record: {sub.record})")
    print("follow it with:")
    print(follow_hints(sub, cfg.cluster), flush=True)
    status = 0
    if args.wait:
        for job in sub.jobs:
            try:
                print(f"job {job.job_id}: {job.results()}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report any job failure as one block, keep waiting for the rest
                print(f"job {job.job_id} failed: {exc}", file=sys.stderr, flush=True)
                status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    mode, rest = argv[0], argv[1:]
    from launch.local import split_entry

    words, rest = split_entry(rest)
    try:
        if mode == "local":
            return _local(words, rest)
        if mode == "slurm":
            return _slurm(words, rest, ["python", "-m", "launch", *argv])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(f"unknown mode {mode!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
