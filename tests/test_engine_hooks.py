"""The engine's contract with models and batch augmentation (pretrain/protocol.py), run through a real Trainer in
one plain process: the model receives the MixGen-mixed batch, each micro-batch of an update gets its own MixGen
draws and the update-counted epoch length, and a batch skipped for a non-finite loss leaves ALBEF's queues and
momentum encoders untouched."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO, subprocess_env

from pretrain.mixgen import BatchMixGen, build_mixgen
from pretrain.protocol import AfterOptimizerStep, BatchAugment, StepState, TrainableModel

SCRIPT = textwrap.dedent(
    """
    import dataclasses, json, sys
    from pathlib import Path

    import torch
    from torch import nn

    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import NonFiniteLossError, Trainer, init_distributed
    from pretrain.mixgen import build_mixgen
    from pretrain.models import ModelOptions, get, register

    TEXTS = ["a red circle", "two blue squares", "a green triangle", "a yellow star", "one small cat",
             "big dog", "an old tree", "the white house"]


    @dataclasses.dataclass
    class ProbeOptions(ModelOptions):
        name: str = "batch_probe"


    class Probe(nn.Module):
        def __init__(self, opts):
            super().__init__()
            self.lin = nn.Linear(3 * 4 * 4, 1)
            self.seen = []

        def forward(self, batch):
            self.seen.append({"text": list(batch["text"]), "image": batch["image"].flatten(1)[:, :4].tolist(),
                              "step": batch["step"], "micro": batch["micro"],
                              "updates_per_epoch": batch["updates_per_epoch"]})
            loss = self.lin(batch["image"].flatten(1)).pow(2).mean()
            return {"loss": loss, "losses": {"mse": loss.detach()}}


    register("batch_probe", ProbeOptions)(Probe)


    class Loader:
        steps_per_epoch = 6  # micro-batches per pass

        def __init__(self, size, nan_calls=()):
            self.gen, self.calls, self.size, self.nan_calls = torch.Generator().manual_seed(0), 0, size, nan_calls

        def __iter__(self):
            while True:
                self.calls += 1
                image = torch.randn(8, 3, self.size, self.size, generator=self.gen)
                if self.calls in self.nan_calls:
                    image = image * float("nan")
                yield {"image": image, "text": list(TEXTS)}


    mode, out = sys.argv[1], Path(sys.argv[2])
    cfg = load_config(PretrainConfig, sys.argv[3], sys.argv[4:])
    env = init_distributed()
    torch.manual_seed(0)
    model = get(cfg.model.name)[1](cfg.model)
    augment = build_mixgen(cfg.mixgen, seed=cfg.run.seed, rank=env.rank)
    if mode == "probe":
        loader = Loader(4)
        Trainer(cfg, model, loader, augment=augment).fit()
        out.write_text(json.dumps(model.seen))
    else:
        loader = Loader(16, nan_calls=(3,))
        try:
            summary = Trainer(cfg, model, loader, augment=augment).fit()
        except NonFiniteLossError as exc:
            summary = {"error": str(exc)}
        queues = model.queues
        out.write_text(json.dumps({
            "summary": {k: summary.get(k) for k in ("error", "steps", "nonfinite_total")},
            "queue_finite": bool(torch.isfinite(queues.image_queue).all() and torch.isfinite(queues.text_queue).all()),
            "ptr": int(queues.queue_ptr),
            "momentum_finite": all(bool(torch.isfinite(p).all()) for p in model.momentum.parameters()),
        }))
    """
)

PROBE_RECIPE = """
run: {seed: 3}
data: {batch_size: 8, image_size: 4}
model: {name: batch_probe}
mixgen: {enabled: true, variant: a, ratio: 0.25, lam: 0.5, image_log_every: 0}
train: {max_steps: 2, grad_accum: 3, lr: 0.01, warmup_steps: 1, checkpoint_every: 0, log_every: 1, export: false}
deepspeed: {zero_stage: 0}
"""

ALBEF_RECIPE = """
run: {seed: 0}
data: {batch_size: 8, image_size: 16}
model:
  name: albef
  vision: {name: vit_tiny_patch16_224, kwargs: {depth: 1, patch_size: 8}}
  text: {config: {num_hidden_layers: 2}}
  image_size: 16
  embed_dim: 16
  queue_size: 48
mixgen: {enabled: false}
train: {max_steps: 4, lr: 1.0e-4, warmup_steps: 1, checkpoint_every: 0, log_every: 1, export: false, max_nonfinite: 3}
deepspeed: {zero_stage: 0}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, mode: str, recipe: str) -> object:
    script, config, out = tmp_path / "run.py", tmp_path / "recipe.yaml", tmp_path / "out.json"
    script.write_text(SCRIPT)
    config.write_text(recipe)
    port = str(_free_port())
    env = subprocess_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(out), str(config), f"run.dir={tmp_path / 'run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_protocols_describe_the_shipped_models_and_mixgen():
    from pretrain.config import MixGenConfig

    augment = build_mixgen(MixGenConfig(enabled=True), seed=0, rank=0)
    assert isinstance(augment, BatchMixGen) and isinstance(augment, BatchAugment)
    assert build_mixgen(MixGenConfig(enabled=False), seed=0, rank=0) is None
    from pretrain.models.albef import Albef
    from pretrain.models.clip import Clip
    from pretrain.models.momentum import FeatureQueues  # noqa: F401 - ALBEF's state lives there

    assert issubclass(Albef, StepState) and issubclass(Albef, AfterOptimizerStep)
    assert issubclass(Clip, AfterOptimizerStep) and not issubclass(Clip, StepState)
    assert isinstance(torch.nn.Linear(1, 1), TrainableModel)  # a plain module has forward: the one requirement


@pytest.mark.slow
def test_model_receives_the_mixed_batch_with_its_own_draws_per_micro_batch(tmp_path):
    from pretrain.config import MixGenConfig
    from pretrain.mixgen import apply_mixgen

    seen = _run(tmp_path, "probe", PROBE_RECIPE)
    assert len(seen) == 6  # 2 updates x grad_accum 3
    assert [(s["step"], s["micro"]) for s in seen] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    # an epoch of 6 loader batches is 2 optimizer updates at grad_accum 3 (ALBEF's alpha ramp counts updates)
    assert all(s["updates_per_epoch"] == pytest.approx(2.0) for s in seen)

    # replay: the loader's raw batches, mixed with the generator of (seed, step, rank, micro)
    cfg = MixGenConfig(enabled=True, variant="a", ratio=0.25, lam=0.5)
    gen = torch.Generator().manual_seed(0)
    texts = ["a red circle", "two blue squares", "a green triangle", "a yellow star", "one small cat", "big dog",
             "an old tree", "the white house"]  # fmt: skip
    for s in seen:
        raw = {"image": torch.randn(8, 3, 4, 4, generator=gen), "text": list(texts)}
        mixed = apply_mixgen(raw, cfg, seed=3, step=s["step"], rank=0, micro=s["micro"])
        assert s["text"] == mixed["text"]  # the model got MixGen's captions ...
        torch.testing.assert_close(torch.tensor(s["image"]), mixed["image"].flatten(1)[:, :4])  # ... and images
        assert s["text"][:2] != texts[:2]  # rows 0-1 are mixtures (M = 0.25 x 8)
        assert s["text"][2:] == texts[2:]
    # (replaying with micro=0 for every micro-batch, the engine's old behaviour, does not match: λ differs)
    first = seen[1]
    gen = torch.Generator().manual_seed(0)
    raws = [{"image": torch.randn(8, 3, 4, 4, generator=gen), "text": list(texts)} for _ in range(2)]
    wrong = apply_mixgen(raws[1], cfg, seed=3, step=0, rank=0, micro=0)
    assert not torch.allclose(torch.tensor(first["image"]), wrong["image"].flatten(1)[:, :4])


@pytest.mark.slow
def test_skipped_nonfinite_batch_leaves_albef_queues_and_momentum_clean(tmp_path):
    # batch 3 has NaN images on the only rank: its loss is NaN, the batch is skipped; had its momentum features
    # reached the queue, every later ITC loss would be NaN and the run would stop after max_nonfinite=3
    result = _run(tmp_path, "albef", ALBEF_RECIPE)
    assert result["summary"]["error"] is None, result["summary"]["error"]
    assert result["summary"]["steps"] == 4 and result["summary"]["nonfinite_total"] == 1
    assert result["queue_finite"] and result["momentum_finite"]
    assert result["ptr"] == 32  # four committed batches of 8, the skipped one not written
