"""``python -m experiments run|report <experiment.yaml> [key=value ...]`` (experiments/README.md).

``run`` trains and evaluates every (arm, seed) not finished yet, through the project's entry points, locally or on
slurm (``launcher: slurm``); ``report`` writes tables with 95 % intervals, paired differences, plots and a JSON of
every number to ``<results>/<name>/``; ``practice`` regenerates docs/practice.md from every report. A recipe
error is one line on stderr and exit status 2, before any work.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.config import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run every (arm, seed) that has not finished")
    run_p.add_argument("--arm", action="append", default=[], help="only this arm (repeatable); names from --dry-run")
    run_p.add_argument("--dry-run", action="store_true", help="print the commands that would run")
    run_p.add_argument("--no-report", action="store_true", help="do not write the report afterwards")
    rep_p = sub.add_parser("report", help="aggregate finished runs into <results>/<name>/")
    pr_p = sub.add_parser("practice", help="generate docs/practice.md from experiments/results/")
    pr_p.add_argument("--out", default="docs/practice.md")
    pr_p.add_argument("--recipes", default="experiments/recipes")
    pr_p.add_argument("--results", default="experiments/results")
    for p in (run_p, rep_p):
        p.add_argument("spec", help="experiment YAML, e.g. experiments/mixgen_web_clip.yaml")
        p.add_argument("overrides", nargs="*", help="key=value overrides of the experiment, e.g. seeds=[0,1]")
        p.add_argument("--carry", type=Path, default=None, metavar="RESULTS_JSON",
                       help="take runs whose folders are gone from this earlier report (same arm and recipe); "
                            "run does not run them again")  # fmt: skip
    args = parser.parse_args(argv)
    from experiments import practice, report, runner
    from experiments.spec import load_spec

    if args.command == "practice":
        try:
            out_md = practice.main(Path(args.out), Path(args.recipes), Path(args.results))
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            return 2
        print(f"practice guide: {out_md}")
        return 0
    command = shlex.join(["python", "-m", "experiments", "run", args.spec, *args.overrides])
    try:
        spec = load_spec(args.spec, args.overrides)
        if args.command == "run":
            carried = report.carried_runs(spec, args.carry) if args.carry is not None else None
            runner.run(spec, args.arm, dry_run=args.dry_run, carried=carried)
            if args.dry_run or args.no_report:
                return 0
        out = report.write(spec, command, args.carry)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"report: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
