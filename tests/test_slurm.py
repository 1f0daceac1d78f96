"""The launcher on a real Slurm cluster (scripts/slurm_local.sh: slurmctld, nodes n1 and n2, slurmdbd, munge):
a 2-node tiny pretraining over gloo, a preempted job that checkpoints, is requeued and ends with the uninterrupted
run's losses, a job that hits its time limit and is requeued until done, and a crash reported as FAILED.

Run alone with ``make test-slurm``; the fixture brings the cluster up when it is not (root + apt needed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_launch import (
    ENV,
    MAX_STEPS,
    PRETRAIN_RECIPE,
    logged_step,
    losses_by_step,
    pretrain_overrides,
    pretrain_recipe,  # noqa: F401 - module fixture reused
    probe_total,
    shards,  # noqa: F401 - module fixture reused
    write_probe,
)

from launch.local import Entry
from launch.slurm import LaunchConfig, submit

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm_local.sh"


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
    states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
    return proc.returncode == 0 and all(states.get(n) in ("idle", "mix", "alloc") for n in ("n1", "n2"))


@pytest.fixture(scope="module")
def cluster():
    """The local cluster, brought up by scripts/slurm_local.sh when it is not (and stopped again afterwards)."""
    started = False
    if not _cluster_up():
        if os.geteuid() != 0:
            pytest.skip("the local Slurm cluster needs root (daemons, /etc/hosts); run `make test-slurm` as root")
        if not shutil.which("apt-get") and not shutil.which("slurmctld"):
            pytest.skip("no Slurm packages and no apt-get to install them (scripts/slurm_local.sh)")
        proc = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"scripts/slurm_local.sh up failed:\n{proc.stdout}\n{proc.stderr}"
        started = True
        assert _cluster_up()
    saved = dict(os.environ)
    os.environ.update(ENV)
    os.environ["PYTHONPATH"] = str(REPO)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if started and os.environ.get("SLURM_LOCAL_KEEP") != "1":
        subprocess.run(["bash", str(SCRIPT), "down"], capture_output=True, timeout=120)


def _sacct_state(job_id: str, timeout: float = 90) -> str:
    """The job's final accounting state (the result files appear a moment before the job leaves RUNNING)."""
    t0, state = time.time(), ""
    while time.time() - t0 < timeout:
        proc = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "state"], capture_output=True, text=True, timeout=30
        )
        state = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        if state and state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING"):
            return state
        time.sleep(1)
    return state


def _debug(nodes: int = 2, **kw) -> LaunchConfig:
    return LaunchConfig(
        cluster="slurm", partition="debug", nodes=nodes, tasks_per_node=1, cpus_per_task=1, **{"time": "20", **kw}
    )


@pytest.fixture(scope="module")
def slurm_reference(cluster, shards, pretrain_recipe, tmp_path_factory) -> Path:  # noqa: F811 - fixtures
    """The uninterrupted 2-node x 1-task run."""
    run_dir = tmp_path_factory.mktemp("slurm_ref") / "run"
    sub = submit(Entry("pretrain"), pretrain_recipe, pretrain_overrides(shards, run_dir), _debug(), check=False)
    results = sub.jobs[0].results()
    assert [(r["rank"], r["node"], r["world_size"], r["restarts"]) for r in results] == [(0, 0, 2, 0), (1, 1, 2, 0)]
    return run_dir


def test_two_node_pretraining_over_gloo(slurm_reference):
    assert [s for s, _ in losses_by_step(slurm_reference)] == list(range(1, MAX_STEPS + 1))
    summary = json.loads((slurm_reference / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == MAX_STEPS
    logs = "\n".join(p.read_text() for p in (slurm_reference / "slurm").glob("*/*_log.out"))
    assert "rank 0/2 node 0" in logs and "rank 1/2 node 1" in logs  # one task on each of n1, n2


def test_preempted_job_checkpoints_requeues_and_matches(slurm_reference, shards, pretrain_recipe, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    sub = submit(Entry("pretrain"), pretrain_recipe, pretrain_overrides(shards, run_dir), _debug(), check=False)
    job = sub.jobs[0]
    t0 = time.time()
    while not logged_step(run_dir, 2):
        assert not job.done(), f"the job ended before it could be preempted: {job.stderr()}"
        assert time.time() - t0 < 400, "no progress"
        time.sleep(1)
    # USR2 to every process of the job's steps (`scancel --signal USR2 <id>`): what Slurm sends before the time
    # limit, and at preemption on clusters with preempt_send_user_signal. (submitit's preemption emulation also
    # sends SIGTERM first, which kills torch DataLoader workers: see docs/cluster.md.)
    job._interrupt(timeout=True)
    results = job.results()
    assert [r["restarts"] for r in results] == [1, 1]
    resumed = losses_by_step(run_dir)
    assert [s for s, _ in resumed] == list(range(1, MAX_STEPS + 1))  # nothing lost, nothing repeated
    reference = dict(losses_by_step(slurm_reference))
    for step, loss in resumed:
        assert loss == pytest.approx(reference[step], abs=1e-6, rel=0), f"step {step}"
    assert "checkpoint written; job requeued" in job.stdout()
    assert _sacct_state(str(job.job_id)) == "COMPLETED"


def test_time_limit_requeues_until_done(cluster, tmp_path, monkeypatch):
    root = write_probe(tmp_path / "probe")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), str(REPO)]))
    monkeypatch.syspath_prepend(str(root))
    recipe = tmp_path / "probe.yaml"
    recipe.write_text(f"run:\n  dir: {tmp_path / 'run'}\n")
    # 1-minute limit, USR2 15 s before it: slurmctld checks limits about every 30 s and signals once the end is
    # within delay + 30 s, so USR2 comes 15-45 s into each run. 60 one-second steps cannot fit in one run.
    cfg = _debug(nodes=1, time="1", signal_delay_s=15, requeue_overrides=["train.resume=latest"])
    sub = submit(Entry("probe_entry"), recipe, ["steps=60", "sleep=1.0"], cfg, check=False)
    result = sub.jobs[0].result()
    assert result["restarts"] >= 1
    out = json.loads((tmp_path / "run" / "result0.json").read_text())
    assert out["step"] == 60 and out["total"] == probe_total(60, 1)  # every step counted once across runs
    executed = [int(x) for x in (tmp_path / "run" / "steps0.txt").read_text().split()]
    assert executed == list(range(1, 61))  # each run resumed exactly where the previous one checkpointed
    assert _sacct_state(str(sub.jobs[0].job_id)) == "COMPLETED"


def test_crash_is_reported_failed_not_requeued(cluster, shards, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    overrides = pretrain_overrides(shards, run_dir) + ["model.embed_dimm=8"]  # a typo, seen only in the job
    sub = submit(Entry("pretrain"), PRETRAIN_RECIPE, overrides, _debug(), check=False)
    job = sub.jobs[0]
    t0 = time.time()
    with pytest.raises(Exception, match="exited with status 2"):
        job.results()
    assert time.time() - t0 < 300  # reported, not hung
    assert _sacct_state(str(job.job_id)) == "FAILED"
    assert "restart 1" not in (job.stdout() or "")
