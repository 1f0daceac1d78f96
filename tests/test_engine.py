"""The shared training engine: schedule, optimizer groups, checkpoint discovery, exact resume after SIGKILL under
torchrun with 2 processes, the agreed non-finite skip/stop, exports and ``model.init``."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO, read_metrics, run_torchrun, subprocess_env
from torch import nn

from launch.config import ConfigError
from pretrain.engine import COMPLETE, KILL_AFTER_STEP_ENV, cosine_with_warmup, find_resume, param_groups
from pretrain.monitor import truncate_jsonl

# ------------------------------------------------------------------------------------------------- unit tests


def test_cosine_with_warmup_values():
    f = cosine_with_warmup(warmup_steps=4, max_steps=14, min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def test_param_groups_exempt_biases_norms_temperature_and_listed_names():
    model = _Toy()
    groups = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    exempt = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.2 and groups[1]["weight_decay"] == 0.0
    assert decayed == {"proj.weight"}
    assert exempt == {"proj.bias", "norm.weight", "norm.bias", "pos_embed", "logit_scale"}


def test_find_resume_uses_newest_complete_checkpoint(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step, complete in ((4, True), (8, True), (12, False)):  # step12: killed while saving
        (ckpts / f"step{step}").mkdir(parents=True)
        if complete:
            (ckpts / f"step{step}" / COMPLETE).write_text("")
    assert find_resume("latest", tmp_path) == (ckpts, "step8")
    assert find_resume("none", tmp_path) is None
    assert find_resume("latest", tmp_path / "fresh") is None
    assert find_resume(str(ckpts / "step4"), tmp_path) == (ckpts, "step4")
    assert find_resume(str(tmp_path), tmp_path / "other") == (ckpts, "step8")
    with pytest.raises(ConfigError, match="train.resume"):
        find_resume(str(ckpts / "step12"), tmp_path)


def test_truncate_jsonl_keeps_steps_up_to_resume_point(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    truncate_jsonl(p, 4)
    assert [json.loads(x)["step"] for x in p.read_text().splitlines()] == [1, 2, 3, 4]


def test_zero3_refused_for_momentum_models():
    from launch.config import load_config
    from pretrain.config import PretrainConfig

    load_config(PretrainConfig, REPO / "configs/pretrain/clip_tiny.yaml", ["deepspeed.zero_stage=3"], check_paths=False)
    for model in ("albef", "tcl"):  # momentum (EMA) encoders
        recipe = REPO / f"configs/pretrain/{model}_tiny.yaml"
        for stage in (0, 1, 2):
            load_config(PretrainConfig, recipe, [f"deepspeed.zero_stage={stage}"], check_paths=False)
        with pytest.raises(ConfigError, match="zero_stage=3.*momentum"):
            load_config(PretrainConfig, recipe, ["deepspeed.zero_stage=3"], check_paths=False)


def test_entry_point_accepts_the_deepspeed_launchers_local_rank():
    from pretrain.__main__ import parse_args

    args = parse_args(["--local_rank=1", "--config", "x.yaml", "train.max_steps=3", "run.seed=2"])
    assert args.config == "x.yaml" and args.overrides == ["train.max_steps=3", "run.seed=2"]


def test_config_error_exits_2_before_any_worker(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain", "--config", "configs/pretrain/clip_tiny.yaml", "train.max_stepz=3"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "train.max_stepz" in proc.stderr and "max_steps" in proc.stderr  # names the key, suggests the fix


# ------------------------------------------------------------------------------------------ multi-process runs


def _clip_args(shards: Path, run_dir: Path) -> list[str]:
    return [
        "-m", "pretrain", "--config", "configs/pretrain/clip_tiny.yaml",
        f"run.dir={run_dir}", f"data.shards={shards}/{{00000..00003}}.tar", "data.batch_size=4", "data.num_workers=1",
        "data.image_size=32", "model.image_size=32", "model.vision.kwargs.channels=[8,16,32,64]",
        "model.text.config.num_hidden_layers=1", "model.embed_dim=32",
        "train.max_steps=12", "train.checkpoint_every=4", "train.log_every=1", "train.warmup_steps=3",
        "mixgen.image_log_every=6", "train.keep_checkpoints=2", "train.peak_flops=1e9",
    ]  # fmt: skip


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def resume_runs(pretrain_shards, tmp_path_factory):
    base = tmp_path_factory.mktemp("engine")
    full, killed = base / "full", base / "killed"
    a = run_torchrun(_clip_args(pretrain_shards, full), timeout=180)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_torchrun(_clip_args(pretrain_shards, killed), timeout=180, **{KILL_AFTER_STEP_ENV: "7"})
    assert b.returncode != 0, "the run should have been killed at step 7"
    after_kill = _losses(killed)
    c = run_torchrun(_clip_args(pretrain_shards, killed), timeout=180)
    assert c.returncode == 0, c.stderr[-3000:]
    return full, killed, after_kill


@pytest.mark.slow
def test_sigkilled_run_resumes_exactly(resume_runs):
    full, killed, after_kill = resume_runs
    assert sorted(after_kill) == list(range(1, 8))  # died right after step 7, before the step-8 checkpoint
    reference, resumed = _losses(full), _losses(killed)
    assert sorted(reference) == sorted(resumed) == list(range(1, 13))
    assert len(set(reference.values())) > 6  # a real, moving loss curve (dropout, MixGen, data order all in play)
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step4") and summary["steps"] == 12
    assert summary["steps_this_run"] == 8
    # keep_checkpoints=2: only the two newest complete checkpoints survive
    tags = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step12", "step8"]
    assert (killed / "checkpoints" / "latest").read_text() == "step12"
    # model FLOPs per sample (counted once per run, the same in both) and MFU beside samples/s, every logged step
    rows = read_metrics(full) + read_metrics(killed)
    flops = {r["flops_per_sample"] for r in rows}
    assert len(flops) == 1 and flops.pop() > 1e6
    for r in rows:
        assert r["mfu"] == pytest.approx(r["flops_per_sample"] * r["samples_per_s"] / 2 / 1e9)  # 2 ranks
    # what a later resume is checked against, before anything loads
    meta = json.loads((killed / "checkpoints" / "step12" / "trainer.json").read_text())
    assert meta["world_size"] == 2 and meta["data.batch_size"] == 4 and meta["model"]["name"] == "clip"


@pytest.mark.slow
def test_run_outputs_tensorboard_export_and_init(resume_runs, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.config import resolve_model_options
    from pretrain.export import load_init, read_export
    from pretrain.models import get

    full = resume_runs[0]
    summary = json.loads((full / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["first_loss"] is not None and summary["samples_per_s"] > 0
    assert (full / "config.yaml").is_file()
    acc = EventAccumulator(str(full / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/itc",
        "train/lr",
        "train/grad_norm",
        "train/logit_scale",
        "train/samples_per_s",
        "train/samples_per_s_per_gpu",
        "train/data_time",
        "train/skipped_samples",
        "train/nonfinite_total",
    ):
        assert tag in tags, tag  # fmt: skip
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    assert "mixgen/pairs" in acc.Tags()["images"]

    state, meta = read_export(full / "export.safetensors")
    assert meta["step"] == 12 and meta["model"]["name"] == "clip"
    opts = resolve_model_options(meta["model"])
    model = get("clip")[1](opts)
    report = load_init(model, str(full / "export.safetensors"), strict=True)
    assert report == {"missing": [], "unexpected": []}
    torch.testing.assert_close(model.state_dict()["image_proj.weight"], state["image_proj.weight"])
    # a run dir initializes from its newest DeepSpeed checkpoint (read with weights_only=True), same weights
    other = get("clip")[1](opts)
    load_init(other, str(full))
    torch.testing.assert_close(other.state_dict()["text_proj.weight"], state["text_proj.weight"])
    with pytest.raises(FileNotFoundError):
        load_init(other, str(tmp_path / "nothing"))


PROBE = textwrap.dedent(
    """
    import dataclasses, json, sys
    from pathlib import Path

    import torch
    from torch import nn

    from launch import preempt
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import NonFiniteLossError, Trainer, init_distributed
    from pretrain.models import ModelOptions, register


    @dataclasses.dataclass
    class ProbeOptions(ModelOptions):
        name: str = "nan_probe"
        nan_rank: int = 1
        nan_calls: list[int] = dataclasses.field(default_factory=list)  # forward calls (1-based) returning NaN
        preempt_call: int = 0  # forward call (1-based) on rank nan_rank that requests preemption


    class Probe(nn.Module):
        def __init__(self, opts):
            super().__init__()
            self.opts, self.calls = opts, 0
            self.lin = nn.Linear(12, 1)

        def forward(self, batch):
            self.calls += 1
            loss = (self.lin(batch["image"].flatten(1)).squeeze(-1) - 1).pow(2).mean()
            if torch.distributed.get_rank() == self.opts.nan_rank and self.calls in self.opts.nan_calls:
                loss = loss * float("nan")
            if torch.distributed.get_rank() == self.opts.nan_rank and self.calls == self.opts.preempt_call:
                preempt.request("test")  # as a SIGTERM/SIGUSR2 handler would, on one rank only
            return {"loss": loss, "losses": {"mse": loss.detach()}}


    register("nan_probe", ProbeOptions)(Probe)


    class Loader:
        steps_per_epoch = 1000

        def __init__(self, rank):
            self.gen = torch.Generator().manual_seed(rank)

        def __iter__(self):
            while True:
                yield {"image": torch.randn(4, 3, 2, 2, generator=self.gen), "text": ["x"] * 4}


    cfg = load_config(PretrainConfig, None, sys.argv[1:])
    env = init_distributed()
    torch.manual_seed(0)
    model = Probe(cfg.model)
    try:
        calls = []

        def evaluate(module, step):
            calls.append(step)
            assert not module.training and not torch.is_grad_enabled()
            return {"bias": float(module.lin.bias), "calls": len(calls)}

        summary = Trainer(cfg, model, Loader(env.rank), evaluate=evaluate, eval_every=2).fit()
        assert model.training  # back in train mode after the evaluations
    except NonFiniteLossError as exc:
        print(f"rank {env.rank} stopped: {exc}", flush=True)
        sys.exit(3)
    out = Path(cfg.run.dir) / f"weights_rank{env.rank}.json"
    out.write_text(json.dumps({"w": model.lin.weight.flatten().tolist(), "summary": summary}))
    """
)


def _probe(tmp_path: Path, nan_calls: list[int], *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    run_dir = tmp_path / "run"
    args = [
        str(script), f"run.dir={run_dir}", "model.name=nan_probe", f"model.nan_calls={nan_calls}",
        "mixgen.enabled=false", "data.batch_size=4", "train.max_steps=6", "train.checkpoint_every=0",
        "train.log_every=1", "train.max_nonfinite=3", "train.export=false", "train.lr=0.01", "train.warmup_steps=1",
        *extra,
    ]  # fmt: skip
    return run_torchrun(args, timeout=300), run_dir


@pytest.mark.slow
def test_nonfinite_on_one_rank_is_skipped_by_all_ranks(tmp_path):
    proc, run_dir = _probe(tmp_path, [2, 3])  # rank 1 only, two batches in a row (< max_nonfinite=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = json.loads((run_dir / "weights_rank0.json").read_text())
    w1 = json.loads((run_dir / "weights_rank1.json").read_text())
    assert w0["w"] == w1["w"] and all(math.isfinite(x) for x in w0["w"])  # both ranks skipped the same updates
    assert w0["summary"]["nonfinite_total"] == 2 and w0["summary"]["steps"] == 6
    # evaluate(module, step) ran on every rank at steps 2, 4 and after the last one; rank 0 logged it
    assert w0["summary"]["eval"]["calls"] == w1["summary"]["eval"]["calls"] == 3
    evals = [json.loads(x) for x in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4, 6] and evals[-1]["bias"] == w0["summary"]["eval"]["bias"]
    assert sorted(_losses(run_dir)) == list(range(1, 7))
    assert all(math.isfinite(v) for v in _losses(run_dir).values())


@pytest.mark.slow
def test_persistent_nonfinite_stops_every_rank_together(tmp_path):
    proc, run_dir = _probe(tmp_path, list(range(3, 100)))
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} stopped: 3 consecutive non-finite losses at step 2" in proc.stdout, proc.stdout[-2000:]
    assert sorted(_losses(run_dir)) == [1, 2]


@pytest.mark.slow
def test_preemption_on_one_rank_checkpoints_all_ranks_and_stops(tmp_path):
    proc, run_dir = _probe(tmp_path, [], "model.preempt_call=3")  # rank 1 asks during step 3
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        summary = json.loads((run_dir / f"weights_rank{rank}.json").read_text())["summary"]
        assert summary["preempted"] is True and summary["steps"] == 3
    assert (run_dir / "checkpoints" / "step3" / COMPLETE).is_file()
    assert (run_dir / "checkpoints" / "latest").read_text() == "step3"
    assert sorted(_losses(run_dir)) == [1, 2, 3]


def test_reference_deepspeed_configs_are_what_the_engine_builds():
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import deepspeed_config

    for stage in (1, 2, 3):
        # the full recipe names bert-base-uncased, which is not on this machine: check the schema, not the names
        recipe = REPO / "configs/pretrain/clip.yaml"
        cfg = load_config(PretrainConfig, recipe, [f"deepspeed.zero_stage={stage}"], check_paths=False)
        on_disk = json.loads((REPO / f"configs/deepspeed/zero{stage}.json").read_text())
        assert on_disk == deepspeed_config(cfg, world_size=1)


@pytest.mark.slow
def test_bf16_zero2_trains_a_cnn_tower(pretrain_shards, resume_runs, tmp_path):
    """bf16 casts parameters, not buffers: the CNN tower's batch-norm statistics must follow (found by gpu_check).
    The bf16 losses track the fp32 run of the same data and warm-up within bf16's precision."""
    run_dir = tmp_path / "bf16"
    args = _clip_args(pretrain_shards, run_dir) + [
        "train.max_steps=3", "train.checkpoint_every=3", "deepspeed.bf16=true", "deepspeed.zero_stage=2",
    ]  # fmt: skip
    proc = run_torchrun(args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses, fp32 = _losses(run_dir), _losses(resume_runs[0])
    assert sorted(losses) == [1, 2, 3]
    # steps 1-2 see the same batches and the same warm-up learning rate as the fp32 run (the cosine tail differs)
    for step in (1, 2):
        assert losses[step] == pytest.approx(fp32[step], rel=3e-2), (step, losses[step], fp32[step])
    assert losses[1] != fp32[1]  # it did run in bf16


def test_a_failed_checkpoint_write_names_the_folder_and_the_free_space(tmp_path):
    import re
    import shutil

    from pretrain.engine import explain_save_errors

    folder = tmp_path / "run" / "checkpoints" / "step50"  # not created yet: free space is read from a parent
    with pytest.raises(RuntimeError) as info:
        with explain_save_errors(folder):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 67255680 vs 67255544")
    msg = str(info.value)
    assert str(folder) in msg and "unexpected pos" in msg and "train.keep_checkpoints" in msg
    free = float(re.search(r"(\d+) MiB free", msg).group(1))
    assert free == pytest.approx(shutil.disk_usage(tmp_path).free / 2**20, rel=0.05)
    with pytest.raises(KeyError):  # anything that is not an I/O failure passes through unchanged
        with explain_save_errors(folder):
            raise KeyError("a bug, not a full disk")
