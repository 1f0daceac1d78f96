"""Settings a user can get wrong are one clear ``config error:`` line, exit status 2, before any worker or process
group starts: values beyond the schema's types, unknown model names, unreadable annotation files; the line is
printed once per job (rank 0), also under ``launch local``; ``--dry-run`` validates and prints a pasteable
command; shipped recipe paths resolve from any working directory."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config import ConfigError, load_config
from tests.helpers import REPO, subprocess_env

CLIP = str(REPO / "configs/pretrain/clip_tiny.yaml")
RETRIEVAL = str(REPO / "configs/finetune/retrieval_synthetic.yaml")


@pytest.fixture
def fake_shard(tmp_path: Path) -> str:
    path = tmp_path / "data" / "00000.tar"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # only its existence is checked before work starts
    return str(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=-1", "train.lr: must be a positive number, got -1"),
        ("train.lr=.nan", "train.lr: must be a positive number"),
        ("train.max_steps=0", "train.max_steps: must be >= 1"),
        ("train.grad_accum=0", "train.grad_accum: must be >= 1"),
        ("train.betas=[0.9,1.5]", "train.betas"),
        ("model.vision.name=vit_tiny_patch16_2244", "'vit_tiny_patch16_2244' is not a timm model (did you mean"),
        ("model.text.name=no-such-org/no-such-bert", "model.text.name: 'no-such-org/no-such-bert' is not 'minilm'"),
        ("model.text.name=./not/a/folder", "model.text.name: ./not/a/folder is not an existing model folder"),
    ],
)
def test_pretrain_settings_beyond_the_schema(override, message, fake_shard):
    from pretrain.config import PretrainConfig

    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, CLIP, [f"data.shards={fake_shard}", override])
    assert message in str(err.value)


def test_good_recipe_still_loads(fake_shard):
    from pretrain.config import PretrainConfig

    cfg = load_config(PretrainConfig, CLIP, [f"data.shards={fake_shard}"])
    assert cfg.train.lr > 0 and cfg.model.vision.name


def test_unreadable_finetune_json_is_a_config_error(tmp_path):
    from finetune.config import FinetuneConfig

    bad = tmp_path / "val.json"
    bad.write_text('[{"image": "a.jpg", "caption": "x"}')  # cut short
    good = tmp_path / "test.json"
    good.write_text(json.dumps([{"image": "a.jpg", "caption": ["x"]}]))
    base = [f"task.test_json={good}", f"task.image_root={tmp_path}", "task.train_json=null", "model.init=none"]
    with pytest.raises(ConfigError, match=r"task.val_json: .*val.json is not valid JSON"):
        load_config(FinetuneConfig, RETRIEVAL, [*base, f"task.val_json={bad}"])
    with pytest.raises(ConfigError, match=r"task.val_json: cannot read"):
        load_config(FinetuneConfig, RETRIEVAL, [*base, f"task.val_json={tmp_path}"])  # a folder
    cfg = load_config(FinetuneConfig, RETRIEVAL, [*base, "task.val_json=null"])
    assert cfg.task.test_json == str(good)


def _run(args: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=600
    )


def _config_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("config error:")]


def test_finetune_cli_bad_json_one_line_exit_2_on_rank_0_only(tmp_path):
    bad = tmp_path / "test.json"
    bad.write_text("{not json")
    args = ["-m", "finetune", "--config", RETRIEVAL, "--eval-only", f"task.test_json={bad}", "task.val_json=null"]
    args += ["task.train_json=null", "model.init=none", f"task.image_root={tmp_path}"]
    rank0 = _run(args, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
    assert rank0.returncode == 2
    assert _config_lines(rank0.stderr) == [
        f"config error: task.test_json: {bad} is not valid JSON: " + "Expecting "
        "property name enclosed in double quotes: line 1 column 2 (char 1)"
    ]
    assert "Traceback" not in rank0.stderr
    rank1 = _run(args, RANK="1", WORLD_SIZE="2", LOCAL_RANK="1")
    assert rank1.returncode == 2 and rank1.stderr.strip() == ""  # every rank stops; only rank 0 says why


def test_launch_local_validates_in_the_launcher(tmp_path, fake_shard):
    run_dir = tmp_path / "run"
    args = ["-m", "launch", "local", "pretrain", "--config", CLIP, "--nproc", "2"]
    args += [f"run.dir={run_dir}", f"data.shards={fake_shard}", "train.lr=-1"]
    proc = _run(args)
    assert proc.returncode == 2
    assert _config_lines(proc.stderr) == ["config error: train.lr: must be a positive number, got -1.0"]
    assert "ChildFailedError" not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    assert not run_dir.exists()  # no worker started, nothing written


def test_dry_run_validates_and_prints_a_pasteable_command(tmp_path, fake_shard):
    run_dir = tmp_path / "a run"  # a space: the printed command must quote it
    args = ["-m", "launch", "local", "pretrain", "--config", CLIP, "--nproc", "2", "--dry-run"]
    args += [f"run.dir={run_dir}", f"data.shards={fake_shard}", "train.max_steps=3"]
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"run folder: {run_dir}"
    cmd = shlex.split(lines[-1])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"] and "--nproc_per_node" in cmd
    assert cmd[cmd.index("-m", 3) :] == ["-m", "pretrain", "--config", CLIP, f"run.dir={run_dir}",
                                         f"data.shards={fake_shard}", "train.max_steps=3"]  # fmt: skip
    assert not run_dir.exists()
    bad = _run([*args, "model.vision.name=nope_net"])
    assert bad.returncode == 2 and _config_lines(bad.stderr)[0].startswith("config error: model.vision.name:")


def test_launch_help_is_one_clean_usage():
    for args in (["--help"], ["local", "--help"], ["slurm", "--help"]):
        proc = _run(["-m", "launch", *args])
        assert proc.returncode == 0
        assert proc.stdout.count("usage:") == 1 and "usage: usage" not in proc.stdout
        assert "docs/cluster.md" in proc.stdout and "docs/pretrain.md" in proc.stdout


@pytest.mark.parametrize(
    "entry, doc",
    [(["pretrain"], "docs/pretrain.md"), (["finetune"], "docs/finetune.md"),
     (["data_prep", "build"], "docs/data_prep.md"), (["data_prep", "style"], "docs/style.md"),
     (["data_prep", "synthetic"], "docs/synthetic.md")],
)  # fmt: skip
def test_entry_help_points_to_the_docs_of_its_keys(entry, doc):
    proc = _run(["-m", *entry, "--help"])
    assert proc.returncode == 0 and doc in proc.stdout
    assert (REPO / doc).is_file()


def test_shipped_recipe_paths_resolve_from_any_working_directory(tmp_path, monkeypatch, fake_shard):
    from data_prep.style.stage import StageConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(StageConfig, "configs/style/stage.yaml", [f"data.shards={fake_shard}", "out.dir=out"])
    assert Path(cfg.model.checkpoint) == REPO / "assets/style_lite0.safetensors"
    assert cfg.out.dir == "out"  # outputs stay relative to the working directory
    public = [f"data.shards={fake_shard}", "model.checkpoint=null", "model.random_init=true"]
    strad = "model.embeddings=assets/strad/checkpoint_embeddings.pth"
    cfg = load_config(StageConfig, "configs/style/stage.yaml", [*public, strad])
    assert Path(cfg.model.embeddings) == REPO / "assets/strad/checkpoint_embeddings.pth"
    (tmp_path / "assets").mkdir()
    with pytest.raises(ConfigError, match="model.embeddings: path does not exist: assets/nope.pth"):
        load_config(StageConfig, "configs/style/stage.yaml", [*public, "model.embeddings=assets/nope.pth"])


# ----------------------------------------------------------------------------------------------- resume
def _saved_run(tmp_path: Path, fake_shard: str) -> tuple[Path, list[str]]:
    """A run folder whose newest complete checkpoint says it was written by 2 ranks with batch 4 (the engine's
    trainer.json), and the overrides of a run that resumes it unchanged."""
    from pretrain.config import PretrainConfig
    from pretrain.engine import RESUME_META, resume_meta

    run = tmp_path / "run"
    overrides = [f"run.dir={run}", f"data.shards={fake_shard}", "data.batch_size=4"]
    cfg = load_config(PretrainConfig, CLIP, overrides)
    tag = run / "checkpoints" / "step8"
    tag.mkdir(parents=True)
    (tag / RESUME_META).write_text(json.dumps(resume_meta(cfg, 2)))
    (tag / "COMPLETE").write_text("")
    return run, overrides


def test_resume_mismatch_is_named_with_both_values_and_the_ways_out(tmp_path, fake_shard):
    from pretrain.config import PretrainConfig
    from pretrain.engine import check_resume

    run, overrides = _saved_run(tmp_path, fake_shard)
    cfg = load_config(PretrainConfig, CLIP, overrides)
    assert check_resume(cfg, 2) == (run / "checkpoints", "step8")
    cases = [
        (overrides, 1, "world size (processes)=2, this run has world size (processes)=1"),
        ([*overrides, "data.batch_size=8"], 2, "data.batch_size=4, this run has data.batch_size=8"),
        ([*overrides, "train.grad_accum=2"], 2, "train.grad_accum=1, this run has train.grad_accum=2"),
        ([*overrides, "model.embed_dim=64"], 2, "another model (model.embed_dim=128 -> 64)"),
    ]
    for ov, world, expect in cases:
        with pytest.raises(ConfigError) as err:
            check_resume(load_config(PretrainConfig, CLIP, ov), world)
        msg = str(err.value)
        assert expect in msg and "step8" in msg and "train.resume=none" in msg and "new run.dir" in msg, msg
    assert check_resume(load_config(PretrainConfig, CLIP, [*overrides, "train.resume=none"]), 1) is None


def test_resume_mismatch_cli_exits_2_before_any_process_group(tmp_path, fake_shard):
    _, overrides = _saved_run(tmp_path, fake_shard)
    args = ["-m", "pretrain", "--config", CLIP, *overrides, "data.batch_size=8"]
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}  # no rank 1 will ever join
    rank0 = _run(args, RANK="0", LOCAL_RANK="0", **env)
    assert rank0.returncode == 2, rank0.stderr[-2000:]
    assert len(_config_lines(rank0.stderr)) == 1 and "data.batch_size=4" in rank0.stderr
    assert "Traceback" not in rank0.stderr
    rank1 = _run(args, RANK="1", LOCAL_RANK="1", **env)
    assert rank1.returncode == 2 and _config_lines(rank1.stderr) == []
