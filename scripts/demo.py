"""``make demo``: the whole pipeline, small, on this machine's CPUs, in a few minutes.

Stages run in order; each one skips work that is already done, so the demo can be re-run or resumed after an
interruption (pretraining resumes from its newest checkpoint). To add a stage (e.g. zero-shot retrieval on the
synthetic test split), write a function ``stage(ctx) -> None`` that fills ``ctx.report`` and append it to
``STAGES``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path("runs/demo")
NPROC = 2


@dataclasses.dataclass
class Context:
    """What the stages share: folders, the subprocess environment, and the lines of the final report."""

    data_dir: Path = DEMO / "data"
    clip_dir: Path = DEMO / "clip"
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    report: list[str] = dataclasses.field(default_factory=list)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
        TOKENIZERS_PARALLELISM="false",
        # NPROC processes share the cores: more threads each would only oversubscribe them
        OMP_NUM_THREADS=str(max(1, (os.cpu_count() or NPROC) // NPROC)),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


def _run(cmd: list[str], env: dict[str, str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: command failed with exit status {proc.returncode}: {' '.join(cmd)}")


def stage_data(ctx: Context) -> None:
    """The synthetic image-text set as webdataset shards (train/val/test)."""
    if (ROOT / ctx.data_dir / "train" / "manifest.json").is_file():
        print(f"[data] {ctx.data_dir} already built, skipping", flush=True)
    else:
        _run(
            [sys.executable, "-m", "data_prep", "synthetic", "--config", "configs/data_prep/synthetic.yaml",
             f"out.dir={ctx.data_dir}"],
            ctx.env,
        )  # fmt: skip
    manifest = json.loads((ROOT / ctx.data_dir / "train" / "manifest.json").read_text())
    shards = manifest.get("shards", [])
    total = sum(int(s.get("samples", s.get("count", 0)) or 0) for s in shards if isinstance(s, dict))
    ctx.report.append(f"data      {ctx.data_dir}: {len(shards)} train shards" + (f", {total} samples" if total else ""))


def stage_pretrain(ctx: Context) -> None:
    """CLIP with MixGen under torchrun (2 processes, DeepSpeed ZeRO-1 on gloo)."""
    summary_path = ROOT / ctx.clip_dir / "summary.json"
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
         "-m", "pretrain", "--config", "configs/pretrain/clip_tiny.yaml", f"run.dir={ctx.clip_dir}"],
        ctx.env,
    )  # fmt: skip
    s = json.loads(summary_path.read_text())
    first, last = s.get("first_loss"), s.get("last_loss")
    ctx.report += [
        f"pretrain  {ctx.clip_dir}: {s['steps']} steps on {s['world_size']} processes, "
        f"loss {first:.3f} -> {last:.3f}, {s['samples_per_s']:.1f} samples/s"
        + (f" (resumed from {s['resumed_from']})" if s.get("resumed_from") else ""),
        f"          export {s.get('export', '-')}, TensorBoard {s['tensorboard']}",
    ]


STAGES: list[tuple[str, Callable[[Context], None]]] = [
    ("data", stage_data),
    ("pretrain", stage_pretrain),
    # further stages (evaluation, fine-tuning) are appended here
]


# ---- zero-shot retrieval stage (finetune helper; see docs/finetune.md) -------------------------------------------
def stage_zeroshot(ctx: Context) -> None:
    """Zero-shot retrieval of the pretrained CLIP on the synthetic test split (``python -m finetune --eval-only``)."""
    out = DEMO / "zeroshot_clip"
    data = ctx.data_dir
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
         "-m", "finetune", "--config", "configs/finetune/retrieval_synthetic.yaml", "--eval-only",
         f"run.dir={out}", f"model.init={ctx.clip_dir}", "eval.splits=[test]", f"task.image_root={data}",
         *(f"task.{s}_json={data}/{s}_retrieval.json" for s in ("train", "val", "test"))],
        ctx.env,
    )  # fmt: skip
    m = json.loads((ROOT / out / "results.json").read_text())["splits"]["test"]
    ctx.report += [
        f"zero-shot {out}: {m['num_images']:.0f} test images x {m['num_texts'] / m['num_images']:.0f} captions, "
        f"TR@1/5/10 {m['txt_r1']:.1f}/{m['txt_r5']:.1f}/{m['txt_r10']:.1f}, "
        f"IR@1/5/10 {m['img_r1']:.1f}/{m['img_r5']:.1f}/{m['img_r10']:.1f}",
        f"          RSUM {m['rsum']:.1f} (chance {m['chance_rsum']:.1f}); top-5 per query: "
        f"{out}/retrieval_test_queries.png",
    ]


STAGES.append(("zero-shot retrieval", stage_zeroshot))


# ---- style randomization stage with the style network trained here (docs/style.md) --------------------------------
def stage_style(ctx: Context) -> None:
    """Style randomization of a slice of the synthetic shards with configs/style/stage.yaml's weights: the network
    trained here (assets/style_lite0.safetensors, from configs/pretrain/style_lite0.yaml)."""
    out = DEMO / "style_shards"
    _run(
        [sys.executable, "-m", "data_prep", "style", "--config", "configs/style/stage.yaml",
         f"data.shards={ctx.data_dir}/train/{{00000..00001}}.tar", f"out.dir={out}", "data.num_workers=1"],
        ctx.env,
    )  # fmt: skip
    manifest = json.loads((ROOT / out / "manifest.json").read_text())
    total = sum(int(s.get("samples", 0)) for s in manifest.get("shards", []) if isinstance(s, dict))
    model = manifest.get("build_config", {}).get("model", {})
    ctx.report += [
        f"style     {out}: {total} samples (originals + stylized copies) by {model.get('checkpoint', model)}",
        f"          grid of originals x random styles: {out}/style_grid.png",
    ]


STAGES.append(("style randomization", stage_style))


def main() -> int:
    os.chdir(ROOT)
    ctx = Context(env=_env())
    t0 = time.perf_counter()
    for name, stage in STAGES:
        print(f"\n=== {name} ===", flush=True)
        stage(ctx)
    print(f"\n=== demo summary ({time.perf_counter() - t0:.0f} s) ===")
    for line in ctx.report:
        print(line)
    print(f"\nlook at the curves and MixGen samples:  tensorboard --logdir {DEMO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
