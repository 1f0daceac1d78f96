"""The launcher without a cluster: entry/recipe parsing, launch recipes, the distributed environment a task exports,
``python -m launch local`` (torchrun), and the submitit task wrapper under submitit's LocalExecutor: a 2-task
tiny pretraining, and one that gets the timeout signal, checkpoints, is restarted and ends with the same losses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import OFFLINE_ENV, REPO, read_metrics

from launch.config import ConfigError
from launch.local import Entry, parse_entry, split_entry, stage_dir, stage_tree, torchrun_command
from launch.slurm import (
    LaunchConfig,
    PreemptedNotRequeued,
    export_dist_env,
    load_launch_config,
    master_port,
    submit,
    time_limit_minutes,
)

ENV = OFFLINE_ENV  # under this name test_slurm imports it

# A tiny entry (`python -m probe_entry --config X [k=v]`) with the engine's preemption protocol: every step
# all-reduces (rank + step) over gloo, agrees on the preemption flag, checkpoints to json, resumes with
# train.resume=latest. Its final total tells whether any step was lost or repeated.
PROBE = textwrap.dedent(
    """
    import argparse, json, os, sys, time
    import torch, torch.distributed as dist
    from launch import preempt
    from launch.dist import close_distributed
    from launch.local import stage_tree

    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = stage_tree(args.config, args.overrides)
    preempt.install()
    if cfg.get("fail"):
        raise RuntimeError("probe asked to fail")
    out = cfg["run"]["dir"]
    os.makedirs(out, exist_ok=True)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if not os.environ.get("LAUNCH_ARRAY"):
        dist.init_process_group("gloo")
    ckpt = os.path.join(out, f"ckpt{rank}.json")
    step, total = 0, 0.0
    if cfg.get("train", {}).get("resume") == "latest" and os.path.exists(ckpt):
        step, total = json.load(open(ckpt))
    steps = int(cfg.get("steps", 10))
    while step < steps:
        value = torch.tensor([float(step + 1 + rank)])
        flag = torch.tensor([1.0 if preempt.requested() else 0.0])
        if dist.is_initialized():
            dist.all_reduce(value)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        total += value.item()
        step += 1
        with open(os.path.join(out, f"steps{rank}.txt"), "a") as f:
            f.write(f"{step}\\n")
        time.sleep(float(cfg.get("sleep", 0.0)))
        if flag.item() > 0:
            json.dump([step, total], open(ckpt, "w"))
            if dist.is_initialized():
                dist.barrier()
            preempt.after_checkpoint()
            close_distributed()
            sys.exit(0)
    json.dump({"step": step, "total": total, "rank": rank, "world": world,
               "port": os.environ.get("MASTER_PORT")}, open(os.path.join(out, f"result{rank}.json"), "w"))
    close_distributed()  # as every entry point does: without it gloo can abort the process at exit (SIGABRT)
    """
)


def write_probe(root: Path) -> Path:
    pkg = root / "probe_entry"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__main__.py").write_text(PROBE)
    return root


def probe_total(steps: int, world: int) -> float:
    """What the probe's all-reduce sums to over an uninterrupted run (each step counted exactly once)."""
    return float(sum(sum(s + 1 + r for r in range(world)) for s in range(steps)))


@pytest.fixture
def probe_env(tmp_path, monkeypatch):
    root = write_probe(tmp_path / "probe")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(REPO)]))  # the jobs' processes
    monkeypatch.syspath_prepend(str(root))  # the submitting process checks that the entry exists
    monkeypatch.chdir(REPO)
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    recipe = tmp_path / "probe.yaml"
    recipe.write_text(f"run:\n  dir: {tmp_path / 'run'}\nsteps: 6\n")
    return recipe


# ------------------------------------------------------------------------------------------------ parsing


def test_entry_words_and_argv():
    words, rest = split_entry(["data_prep", "build", "--config", "x.yaml", "out.dir=y"])
    assert words == ["data_prep", "build"] and rest == ["--config", "x.yaml", "out.dir=y"]
    words, rest = split_entry(["pretrain", "train.lr=1", "--config", "c.yaml"])
    assert words == ["pretrain"] and rest == ["train.lr=1", "--config", "c.yaml"]
    entry = parse_entry(words)
    assert entry.argv("c.yaml", ["a=1"]) == ["--config", "c.yaml", "a=1"] and entry.trains
    build = parse_entry(["data_prep", "build"])
    assert build.argv("c.yaml", []) == ["build", "--config", "c.yaml"] and not build.trains
    assert build.slug == "data_prep-build"
    for bad in ([], ["pre-train"], ["data_prep", "b;rm"], ["a", "b", "c"]):
        with pytest.raises(ConfigError, match="entry"):
            parse_entry(bad)


def test_stage_tree_applies_overrides_and_finds_the_run_folder(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("run:\n  dir: runs/a\ntrain:\n  lr: 0.1\n")
    tree = stage_tree(recipe, ["run.dir=runs/b", "train.max_steps=3"])
    assert tree == {"run": {"dir": "runs/b"}, "train": {"lr": 0.1, "max_steps": 3}}
    assert stage_dir(tree) == Path("runs/b")
    assert stage_dir({"out": {"dir": "data/x"}}) == Path("data/x")  # data_prep recipes
    with pytest.raises(ConfigError, match="run.dir nor out.dir"):
        stage_dir({"train": {}})
    with pytest.raises(ConfigError, match="key=value"):
        stage_tree(recipe, ["oops"])


@pytest.mark.parametrize(
    "text,minutes",
    [("30", 30), ("30:30", 30.5), ("4:00:00", 240), ("1-12", 2160), ("1-12:30", 2190), ("0-0:1:30", 1.5)],
)
def test_slurm_time_formats(text, minutes):
    assert time_limit_minutes(text) == pytest.approx(minutes)


def test_launch_recipes_load_and_bad_keys_are_named():
    for name in ("local", "slurm_a100", "slurm_debug"):
        cfg = load_launch_config(REPO / "configs" / "launch" / f"{name}.yaml")
        assert cfg.max_requeues >= 1
    a100 = load_launch_config(REPO / "configs" / "launch" / "slurm_a100.yaml", ["nodes=4"])
    assert a100.nodes == 4 and a100.ntasks_per_node == 8  # one task per GPU
    with pytest.raises(ConfigError, match="unknown config key 'partiton'.*partition"):
        load_launch_config(None, ["partiton=gpu"])
    with pytest.raises(ConfigError, match="one task per GPU"):
        load_launch_config(None, ["gpus_per_node=8", "tasks_per_node=2"])
    with pytest.raises(ConfigError, match="signal_delay_s"):
        load_launch_config(None, ["time=1", "signal_delay_s=45"])  # USR2 would come before Python starts
    with pytest.raises(ConfigError, match="time"):
        load_launch_config(None, ["time=4h"])
    with pytest.raises(ConfigError, match="this machine only"):
        load_launch_config(None, ["cluster=local", "nodes=2"])


def test_cli_reports_config_errors_with_status_2(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run:\n  dir: {tmp_path}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "slurm", "pretrain", "--config", str(recipe), "launch.qso=high"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "qso" in proc.stderr and "qos" in proc.stderr


def test_preflight_check_rejects_a_bad_stage_key_before_submitting(tmp_path):
    cfg = LaunchConfig(cluster="local", tasks_per_node=1)
    overrides = [f"run.dir={tmp_path / 'run'}", "train.max_stepz=3"]
    with pytest.raises(ConfigError, match="train.max_stepz"):
        submit(Entry("pretrain"), REPO / "configs/pretrain/clip_tiny.yaml", overrides, cfg, check=True)
    assert not (tmp_path / "run" / "slurm").exists()  # nothing submitted, nothing written


def test_preflight_check_validates_through_the_entry_registry(tmp_path, monkeypatch):
    """The entry's own registered loader validates (its extra checks too); a loader that cannot be found is an
    error, never a silently skipped check."""
    from launch import recipes

    cfg = LaunchConfig(cluster="local", tasks_per_node=1)
    finetune = REPO / "configs/finetune/retrieval_synthetic.yaml"
    test_json = tmp_path / "test.json"
    test_json.write_text('[{"image": "a.jpg", "caption": ["x"]}]')
    with pytest.raises(ConfigError, match="task.train_json: required"):  # the finetune loader's check, not the schema's
        overrides = [
            f"run.dir={tmp_path / 'run'}",
            "model.init=none",
            "task.train_json=null",
            "task.val_json=null",
            f"task.image_root={tmp_path}",
        ]
        submit(Entry("finetune"), finetune, [*overrides, f"task.test_json={test_json}"], cfg, check=True)
    recipe = REPO / "configs/pretrain/clip_tiny.yaml"
    monkeypatch.setitem(recipes.MODULES, "pretrain", "pretrain.no_such_module")
    monkeypatch.setattr(recipes._RECIPES, "_entries", {})
    with pytest.raises(ConfigError, match="registers no recipe loader"):
        submit(Entry("pretrain"), recipe, [f"run.dir={tmp_path / 'run'}"], cfg, check=True)
    assert not (tmp_path / "run" / "slurm").exists()


# ------------------------------------------------------------------------------------------- distributed env


def _fake_job(**kw):
    base = dict(job_id="77", hostnames=["n1", "n2"], global_rank=3, local_rank=1, num_tasks=4, num_nodes=2, node=1)
    return SimpleNamespace(**{**base, **kw})


def test_task_environment_from_slurm_job(monkeypatch):
    monkeypatch.setattr(os, "environ", dict(os.environ))  # the exported variables must not leak into later tests
    env = export_dist_env(_fake_job(), restarts=0)
    assert env == {
        "MASTER_ADDR": "n1",  # first node of the job
        "MASTER_PORT": str(master_port("77", 0)),
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
    }
    assert os.environ["RANK"] == "3"
    ports = [master_port(str(job), r) for job in range(200) for r in range(3)]
    assert min(ports) >= 20000 and max(ports) < 32768  # below the kernel's ephemeral ports (gloo, clients)
    local = Path("/proc/sys/net/ipv4/ip_local_port_range")
    if local.is_file():
        assert max(ports) < int(local.read_text().split()[0])
    assert master_port("77", 0) == master_port("77", 0) != master_port("77", 1)  # a restart gets a new port
    # an array task: RANK/WORLD_SIZE = (array index, array size) for the shard split, no process group
    arr = export_dist_env(_fake_job(job_id="9_2", global_rank=0, num_tasks=1, num_nodes=1), 0, shard=(2, 5))
    assert (arr["RANK"], arr["WORLD_SIZE"], arr["LOCAL_RANK"], arr["LAUNCH_ARRAY"]) == ("2", "5", "0", "1")
    export_dist_env(_fake_job(), restarts=0)
    assert "LAUNCH_ARRAY" not in os.environ  # a training task started from inside an array task is not one


def test_preempt_flag_is_set_by_usr2_and_not_widened_by_a_second_install():
    code = textwrap.dedent(
        """
        import os, signal
        from launch import preempt
        preempt.install((signal.SIGUSR2,))
        preempt.install()  # the engine's default call must not add SIGTERM
        assert preempt.installed_signals() == (signal.SIGUSR2,)
        assert not preempt.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preempt.requested() and preempt.reasons() == ["SIGUSR2"]
        seen = []
        preempt.set_after_checkpoint_hook(lambda: seen.append(1))
        preempt.after_checkpoint()
        assert preempt.checkpointed() and seen == [1]
        preempt.clear()
        assert not preempt.requested() and not preempt.checkpointed() and preempt.reasons() == []
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------------------------------------- torchrun


def test_local_dry_run_prints_torchrun_with_a_free_port(tmp_path):
    cmd = torchrun_command(Entry("data_prep", "style"), "c.yaml", ["a=1"], nproc=4, master_port=12345)
    assert cmd[1:] == [
        "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "4", "--master_addr", "127.0.0.1",
        "--master_port", "12345", "-m", "data_prep", "style", "--config", "c.yaml", "a=1",
    ]  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run:\n  dir: {tmp_path}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "launch", "local", "pretrain", "--config", str(recipe), "--nproc", "2", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "--nproc_per_node 2 --master_addr 127.0.0.1 --master_port" in proc.stdout and "-m pretrain" in proc.stdout


@pytest.mark.slow
def test_two_local_runs_at_once_do_not_collide(probe_env, tmp_path):
    procs = []
    for name in ("a", "b"):
        cmd = [sys.executable, "-m", "launch", "local", "probe_entry", "--config", str(probe_env), "--nproc", "2",
               f"run.dir={tmp_path / name}", "steps=4"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ports = set()
    for name in ("a", "b"):
        for rank in (0, 1):
            result = json.loads((tmp_path / name / f"result{rank}.json").read_text())
            assert result["world"] == 2 and result["total"] == probe_total(4, 2)
            ports.add(result["port"])
        record = json.loads((tmp_path / name / "launch" / "local.json").read_text())
        assert record["entry"] == "probe_entry" and "--nproc_per_node" in record["command"]
    assert len(ports) == 2  # each run got its own rendezvous port


# -------------------------------------------------------------------------------- submitit LocalExecutor


def _task_pids(controller_pid: int) -> list[int]:
    """The LocalExecutor controller's children: the tasks (what its own timeout signal goes to)."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == controller_pid:
            pids.append(int(name))
    return pids


def _signal_tasks_when(job, ready, timeout: float = 400) -> None:
    """Send USR2 to every task once ``ready()`` — exactly what the controller does at its timeout, but at a
    chosen step rather than at a wall-clock time, so the test does not depend on this machine's speed."""
    t0 = time.time()
    while not ready():
        assert not job.done(), f"job ended before it could be interrupted: {job.stderr()}"
        assert time.time() - t0 < timeout, "the job made no progress"
        time.sleep(0.5)
    pids = _task_pids(job._process.pid)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)


def test_local_executor_array_maps_index_to_rank(probe_env, tmp_path):
    cfg = LaunchConfig(cluster="local", array=2, time="10:00", signal_delay_s=30)
    sub = submit(Entry("probe_entry"), probe_env, ["steps=3"], cfg, check=False)
    assert len(sub.jobs) == 2
    results = [job.result() for job in sub.jobs]
    assert [(r["rank"], r["world_size"]) for r in results] == [(0, 2), (1, 2)]
    for rank in (0, 1):
        out = json.loads((tmp_path / "run" / f"result{rank}.json").read_text())
        assert (out["rank"], out["world"]) == (rank, 2)
        assert out["total"] == float(sum(s + 1 + rank for s in range(3)))  # no process group: own values only


def test_local_executor_failure_is_reported_not_requeued(probe_env, tmp_path):
    cfg = LaunchConfig(cluster="local", tasks_per_node=2, time="10:00", signal_delay_s=30)
    sub = submit(Entry("probe_entry"), probe_env, ["fail=true"], cfg, check=False)
    job = sub.jobs[0]
    with pytest.raises(Exception, match="probe asked to fail"):
        job.result()
    assert not list((tmp_path / "run" / "slurm").glob("*/*_requeues"))
    assert "restart 1" not in job.stdout()


@pytest.mark.slow
def test_local_executor_stops_requeuing_at_max_requeues(probe_env, tmp_path):
    cfg = LaunchConfig(cluster="local", tasks_per_node=2, time="10:00", signal_delay_s=30, max_requeues=0)
    sub = submit(Entry("probe_entry"), probe_env, ["steps=200", "sleep=0.05"], cfg, check=False)
    job = sub.jobs[0]
    _signal_tasks_when(job, lambda: (tmp_path / "run" / "steps0.txt").exists())
    with pytest.raises(Exception, match="max_requeues=0 reached"):
        job.result()
    assert PreemptedNotRequeued.__name__ in job.stderr()
    step, _ = json.loads((tmp_path / "run" / "ckpt0.json").read_text())
    assert 0 < step < 200  # it did checkpoint, then stopped


# ------------------------------------------------------------------------------ tiny pretraining, 2 tasks

PRETRAIN_RECIPE = REPO / "configs" / "pretrain" / "clip_tiny.yaml"
MAX_STEPS = 6


@pytest.fixture(scope="module")
def pretrain_recipe(tmp_path_factory) -> Path:
    """One copy of the recipe for the reference and the interrupted run of a module, so both see the same one."""
    copy = tmp_path_factory.mktemp("recipe") / "clip_tiny.yaml"
    shutil.copyfile(PRETRAIN_RECIPE, copy)
    return copy


@pytest.fixture(scope="module")
def shards(pretrain_shards) -> Path:
    """The session's tiny pretraining shards, under the name test_slurm imports."""
    return pretrain_shards


def pretrain_overrides(shards: Path, run_dir: Path) -> list[str]:
    """The engine tests' tiny CLIP: 32 px, one layer per tower, 6 steps."""
    return [
        f"run.dir={run_dir}", f"data.shards={shards}/{{00000..00003}}.tar", "data.batch_size=4",
        "data.num_workers=1", "data.image_size=32", "model.image_size=32", "model.vision.kwargs.channels=[8,16,32,64]",
        "model.text.config.num_hidden_layers=1", "model.embed_dim=32", f"train.max_steps={MAX_STEPS}",
        "train.checkpoint_every=100", "train.log_every=1", "train.warmup_steps=2", "mixgen.image_log_every=0",
        "train.export=false",
    ]  # fmt: skip


def losses_by_step(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir)]


def logged_step(run_dir: Path, at_least: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(s >= at_least for s, _ in losses_by_step(run_dir))


@pytest.fixture(scope="module")
def local_env():
    saved = dict(os.environ)
    os.environ.update(ENV)
    os.environ["PYTHONPATH"] = str(REPO)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def reference_run(shards, pretrain_recipe, tmp_path_factory, local_env) -> Path:
    run_dir = tmp_path_factory.mktemp("launch_ref") / "run"
    cfg = LaunchConfig(cluster="local", tasks_per_node=2, time="30:00", signal_delay_s=60)
    sub = submit(Entry("pretrain"), pretrain_recipe, pretrain_overrides(shards, run_dir), cfg, check=False)
    results = sub.jobs[0].results()
    assert [(r["rank"], r["world_size"], r["restarts"]) for r in results] == [(0, 2, 0), (1, 2, 0)]
    return run_dir


@pytest.mark.slow
def test_local_executor_two_task_pretraining(reference_run):
    steps = [s for s, _ in losses_by_step(reference_run)]
    assert steps == list(range(1, MAX_STEPS + 1))
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == MAX_STEPS and not summary["preempted"]
    record = next((reference_run / "slurm").glob("launch-*.yaml")).read_text()
    assert "entry: pretrain" in record and "cluster: local" in record
    snapshot = next((reference_run / "slurm").glob("pretrain-*.yaml")).read_text()
    assert f"max_steps: {MAX_STEPS}" in snapshot  # the job ran from the recipe snapshot, overrides applied


@pytest.mark.slow
def test_local_executor_timeout_signal_checkpoints_restarts_and_matches(
    reference_run, shards, pretrain_recipe, tmp_path, local_env
):
    run_dir = tmp_path / "run"
    cfg = LaunchConfig(cluster="local", tasks_per_node=2, time="30:00", signal_delay_s=60)
    sub = submit(Entry("pretrain"), pretrain_recipe, pretrain_overrides(shards, run_dir), cfg, check=False)
    job = sub.jobs[0]
    _signal_tasks_when(job, lambda: logged_step(run_dir, 2))
    results = job.results()
    assert [r["restarts"] for r in results] == [1, 1]  # checkpointed, restarted once, finished
    log = job.stdout()
    assert "checkpoint written; job requeued" in log and "train.resume=latest" in log
    resumed = losses_by_step(run_dir)
    # every step exactly once (no lost, no repeated step), and the same losses as the uninterrupted run
    assert [s for s, _ in resumed] == list(range(1, MAX_STEPS + 1))
    reference = dict(losses_by_step(reference_run))
    for step, loss in resumed:
        assert loss == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] and summary["steps"] == MAX_STEPS and summary["steps_this_run"] < MAX_STEPS
