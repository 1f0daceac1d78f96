"""Check and time every GPU path in one run, so a short window on a GPU machine is used well.

Runs, in order, each in its own process with a time limit, and prints one table of outcomes at the end:

1. ``bench/pretrain_step.py --device cuda --bf16``: step time, MixGen overhead, momentum share, peak memory.
2. ``bench/style_stage.py --gpu``: the style network in bf16/channels_last, end to end from shards at 256².
3. a 2-process DeepSpeed pretraining of ``clip_tiny`` with ``deepspeed.bf16=true`` (NCCL) and its resume.
4. ``data_prep style`` over the synthetic shards on the GPU.

Usage (on the GPU machine, after ``make venv``)::

    .venv/bin/python bench/gpu_check.py [--quick] [--out runs/gpu_check]

Without CUDA it says so and exits with status 0 (nothing to check here); ``--force`` runs the steps anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    import torch

    if torch.cuda.is_available():
        env.pop("DS_ACCELERATOR", None)  # let DeepSpeed pick CUDA
    else:
        env["DS_ACCELERATOR"] = "cpu"  # --force smoke run: DeepSpeed's auto-detection would not pick the CPU
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def _step(name: str, cmd: list[str], timeout: int, log_dir: Path) -> dict[str, object]:
    print(f"\n=== {name}\n$ {' '.join(cmd)}", flush=True)
    log = log_dir / f"{name.replace(' ', '_')}.log"
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timeout after {timeout} s"
        output = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    log.write_text(output)
    tail = "\n".join(output.strip().splitlines()[-25:])
    print(tail, flush=True)
    return {"step": name, "status": status, "seconds": round(time.time() - t0, 1), "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/gpu_check")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller sizes")
    parser.add_argument("--force", action="store_true", help="run even without CUDA (smoke test of this script)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.force:
        print("gpu_check: no CUDA device here; nothing to check (use --force for a CPU smoke run)")
        return 0
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    device = "cuda" if torch.cuda.is_available() else "cpu"
    nproc = str(min(2, max(1, torch.cuda.device_count())))
    data = out / "data"
    reps = ["--reps", "3", "--warmup", "1"] if args.quick else []
    results = [
        _step(
            "synthetic data",
            [py, "-m", "data_prep", "synthetic", "--config", "configs/data_prep/synthetic.yaml", f"out.dir={data}"],
            300,
            out,
        ),
        _step(
            "pretrain step",
            [py, "bench/pretrain_step.py", "--device", device, "--bf16", "--batch", "64", *reps],
            900,
            out,
        ),
        _step(
            "style stage bench",
            [py, "bench/style_stage.py", "--gpu", "--device", device, *(["--tiny"] if args.quick else [])],
            900,
            out,
        ),
    ]
    train = [
        py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", nproc, "-m", "pretrain",
        "--config", "configs/pretrain/clip_tiny.yaml", f"run.dir={out / 'clip'}",
        f"data.shards={data}/train/{{00000..00007}}.tar", "deepspeed.bf16=true", "deepspeed.zero_stage=2",
    ]  # fmt: skip
    results.append(_step("ddp bf16 pretrain", [*train, "train.max_steps=40"], 900, out))
    results.append(_step("resume", [*train, "train.max_steps=60"], 900, out))
    stage = [
        py, "-m", "data_prep", "style", "--config", "configs/style/stage.yaml",
        f"data.shards={data}/train/{{00000..00001}}.tar", f"out.dir={out / 'styled'}",
    ]  # fmt: skip
    results.append(_step("style stage on gpu", stage, 900, out))
    summary = out / "summary.json"
    summary.write_text(json.dumps(results, indent=2))
    print("\n| step | status | seconds |\n|---|---|---|")
    for r in results:
        print(f"| {r['step']} | {r['status']} | {r['seconds']} |")
    print(f"\nlogs and summary: {out}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
