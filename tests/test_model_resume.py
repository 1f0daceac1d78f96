"""Exact resume under torchrun with 2 processes for the pretraining models: train 4 steps (checkpoints at 2 and 4),
restart a copy from the step-2 checkpoint; the resumed steps and the final weights equal the uninterrupted run's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from helpers import read_metrics, run_torchrun


class Case(NamedTuple):
    overrides: list[str]  # what makes the tiny recipe tinier
    losses: list[str]  # logged per step, besides "loss"
    keys: list[str]  # the export must hold these
    queue: bool  # momentum queues: their pointer tells how many samples went in


# ALBEF and TCL: one text and one fusion layer, small projections and a queue of 16 (= 2 global batches).
FUSION = ["model.vision.kwargs.depth=1", "model.text.config.num_hidden_layers=2", "model.fusion_layer=1",
          "model.embed_dim=32", "model.queue_size=16"]  # fmt: skip
MOMENTUM_KEYS = ["queues.image_queue", "momentum.vision_proj.weight"]
MODELS = {
    "albef": Case(FUSION, ["itc", "itm", "mlm"], MOMENTUM_KEYS, queue=True),
    "tcl": Case(FUSION, ["itc", "itm", "mlm", "imc", "lmi"], MOMENTUM_KEYS, queue=True),
    # ViLT: one transformer over patches and words (no fusion layer, projections or queues); WPA stays on
    "vilt": Case(["model.depth=1"], ["itm", "mlm", "wpa"], ["itm_head.weight", "mlm_head.3.weight"], queue=False),
}


def _train(model: str, shards: Path, run_dir: Path, max_steps: int) -> None:
    args = [
        "-m", "pretrain", "--config", f"configs/pretrain/{model}_tiny.yaml", f"run.dir={run_dir}",
        f"data.shards={shards}/{{00000..00003}}.tar", "data.batch_size=4", "data.num_workers=1",
        "data.image_size=32", "model.image_size=32", *MODELS[model].overrides,
        f"train.max_steps={max_steps}", "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=1",
        "train.lr=3e-4", "deepspeed.zero_stage=2",
    ]  # fmt: skip
    proc = run_torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("model", list(MODELS))
def test_torchrun_two_ranks_resume_matches_uninterrupted_run(model, pretrain_shards, tmp_path):
    """Steps 3-4 of the resumed run and its final weights (momentum twins and queues included, where the model has
    them) are exactly the uninterrupted run's."""
    from safetensors.torch import load_file

    full = tmp_path / "full"
    _train(model, pretrain_shards, full, 4)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step4")
    (resumed / "checkpoints" / "latest").write_text("step2")
    (resumed / "export.safetensors").unlink()
    _train(model, pretrain_shards, resumed, 4)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step2") and summary["steps_this_run"] == 2

    reference = {r["step"]: r for r in read_metrics(full)}
    again = {r["step"]: r for r in read_metrics(resumed)}
    assert sorted(again) == sorted(reference) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ["loss", *MODELS[model].losses]:
            assert again[step][key] == pytest.approx(reference[step][key], abs=1e-6, rel=0), (step, key)
    a, b = load_file(str(full / "export.safetensors")), load_file(str(resumed / "export.safetensors"))
    assert a.keys() == b.keys() and all(k in a for k in MODELS[model].keys)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    if MODELS[model].queue:
        assert int(a["queues.queue_ptr"]) == (4 * 4 * 2) % 16  # 4 steps x batch 4 x 2 ranks, modulo the queue
