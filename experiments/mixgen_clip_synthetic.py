"""MixGen off vs on for the tiny CLIP on the synthetic set (docs/experiments.md).

Trains ``configs/pretrain/clip_tiny.yaml`` twice per seed, with ``mixgen.enabled=false`` and ``true`` (the default
variant), same seed and same steps, through the real entry points (``python -m torch.distributed.run -m pretrain``
and ``python -m finetune --eval-only``), then prints zero-shot retrieval on the synthetic test split and the
difference on minus off. Needs the synthetic set (``make demo`` or ``python -m data_prep synthetic ...``).

    .venv/bin/python experiments/mixgen_clip_synthetic.py                 # seed 0, ~10 min on 2 cores
    .venv/bin/python experiments/mixgen_clip_synthetic.py --seeds 0 1 --steps 300 --nproc 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "configs/pretrain/clip_tiny.yaml"
EVAL_RECIPE = "configs/finetune/retrieval_synthetic.yaml"
METRICS = ("rsum", "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10")
HEADERS = ("RSUM", "TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "loss")


def _env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or nproc) // nproc))),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    """Run ``cmd`` in the repository root with its output in ``log``; a failure names the command and the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"exit status {proc.returncode}: {' '.join(cmd)}\n  see {log}")


def model_overrides(recipe: str) -> list[str]:
    """The pretrain recipe's model section as ``model.*`` overrides, so evaluation builds the same network."""
    model = yaml.safe_load((ROOT / recipe).read_text())["model"]
    out = []
    for key, value in model.items():
        if key in ("name", "init"):
            continue
        if key == "text":
            value = {**value, "pretrained": False}  # the weights come from model.init
        out.append(f"model.{key}={json.dumps(value)}")
    return out


def train_and_eval(
    out: Path, data: Path, seed: int, mixgen: bool, steps: int, nproc: int, env: dict[str, str]
) -> dict[str, Any]:
    """Pretrain one variant (resuming if already done), evaluate it zero-shot on the test split, return metrics."""
    run_dir = out / f"seed{seed}_mixgen_{'on' if mixgen else 'off'}"
    shards = sorted((data / "train").glob("*.tar"))
    if not shards:
        raise SystemExit(f"no training shards in {data / 'train'}: build the synthetic set first (make demo)")
    spec = f"{data}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar"
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "-m", "pretrain", "--config", RECIPE, f"run.dir={run_dir / 'clip'}", f"run.seed={seed}",
         f"data.shards={spec}", f"mixgen.enabled={str(mixgen).lower()}", f"train.max_steps={steps}",
         "mixgen.image_log_every=0", "train.log_every=25"],
        env, run_dir / "pretrain.log",
    )  # fmt: skip
    _run(
        [sys.executable, "-m", "finetune", "--config", EVAL_RECIPE, "--eval-only", f"run.dir={run_dir / 'zeroshot'}",
         f"model.init={run_dir / 'clip'}", "eval.splits=[test]", f"task.image_root={data}", "eval.qualitative=0",
         *(f"task.{s}_json={data}/{s}_retrieval.json" for s in ("train", "val", "test")), *model_overrides(RECIPE)],
        env, run_dir / "eval.log",
    )  # fmt: skip
    summary = json.loads((run_dir / "clip" / "summary.json").read_text())
    metrics = json.loads((run_dir / "zeroshot" / "results.json").read_text())["splits"]["test"]
    return {**{k: float(metrics[k]) for k in METRICS}, "loss": float(summary["last_loss"]),
            "chance_rsum": float(metrics["chance_rsum"]), "steps": int(summary["steps"])}  # fmt: skip


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A fixed-width table of ``(label, metrics)`` rows (RSUM, recalls in %, final training loss)."""
    lines = [f"{'run':<22}" + "".join(f"{h:>8}" for h in HEADERS)]
    for label, m in rows:
        lines.append(f"{label:<22}" + "".join(f"{m[k]:>8.2f}" for k in (*METRICS, "loss")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data"), help="synthetic set (train/test shards)")
    parser.add_argument("--out", type=Path, default=Path("runs/experiments/mixgen_clip_synthetic"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (the demo recipe's 150)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training run")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    env = _env(args.nproc)
    t0 = time.perf_counter()
    rows: list[tuple[str, dict[str, float]]] = []
    results: dict[str, Any] = {"recipe": RECIPE, "steps": args.steps, "nproc": args.nproc, "runs": {}}
    for seed in args.seeds:
        off = train_and_eval(args.out, args.data, seed, False, args.steps, args.nproc, env)
        on = train_and_eval(args.out, args.data, seed, True, args.steps, args.nproc, env)
        diff = {k: on[k] - off[k] for k in (*METRICS, "loss")}
        rows += [(f"seed {seed} MixGen off", off), (f"seed {seed} MixGen on", on), (f"seed {seed} on - off", diff)]
        results["runs"][str(seed)] = {"off": off, "on": on, "diff": diff}
    if len(args.seeds) > 1:
        mean = {
            k: sum(results["runs"][str(s)]["diff"][k] for s in args.seeds) / len(args.seeds) for k in (*METRICS, "loss")
        }
        rows.append((f"mean on - off ({len(args.seeds)})", mean))
        results["mean_diff"] = mean
    table = format_table(rows)
    chance = rows[0][1].get("chance_rsum", float("nan"))
    print(f"\nzero-shot retrieval, synthetic test split, {args.steps} steps x {args.nproc} processes "
          f"(chance RSUM {chance:.1f}; {time.perf_counter() - t0:.0f} s)\n{table}")  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"results: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
