"""``python -m launch slurm <entry> --config <recipe> --nodes N --gpus-per-node G ...``: submit through submitit.

One Slurm task per GPU (``tasks_per_node = gpus_per_node``; on CPU-only clusters ``gpus_per_node: 0`` and an
explicit ``tasks_per_node``). Each task exports the torch.distributed variables from Slurm's (MASTER_ADDR = first
node, MASTER_PORT derived from the job id, RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) and runs the entry
in-process (``runpy``), so that signal handling and the requeue decision stay inside the task.

Preemption and time limits: Slurm sends USR2 ``signal_delay_s`` before the limit (``#SBATCH --signal``), or on
preemption. submitit's own USR2 handler would checkpoint on rank 0 and requeue at once, killing the job before the
training loop has saved. The task therefore replaces it with :mod:`launch.preempt`'s flag on every rank; the loop
finishes its step, all ranks agree, the checkpoint is written, and only then :func:`launch.preempt.after_checkpoint`
runs our hook: rank 0 calls ``scontrol requeue`` (or, under submitit's LocalExecutor, the tasks exit with its
requeue code). The requeued job runs the same task again with ``train.resume=latest``. Requeues are counted
(``SLURM_RESTART_COUNT``) and stop at ``max_requeues``; a job that fails for any other reason is not requeued.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
import runpy
import secrets
import shlex
import signal
import subprocess
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from launch import preempt
from launch.config import ConfigError, load_config, to_dict, validate_tree
from launch.local import Entry, check_module, check_stage_config, stage_dir, stage_tree

# submitit's LocalExecutor restarts the tasks when one exits with this code; we use it on Slurm too so that the
# requeued tasks' exit status is recognisable in the logs.
REQUEUE_EXIT_CODE = 144


@dataclasses.dataclass
class LaunchConfig:
    """Where and how a job runs (``configs/launch/*.yaml``; command-line flags and ``launch.<key>=`` override it)."""

    cluster: Literal["slurm", "local"] = "slurm"  # local: submitit's LocalExecutor on this machine (no Slurm)
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: gpus_per_node (one task per GPU), or 1 without GPUs
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time: str = "4:00:00"  # Slurm formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
    constraint: str | None = None
    qos: str | None = None
    account: str | None = None
    signal_delay_s: int = 120  # USR2 this long before the time limit: enough for one step + a checkpoint
    max_requeues: int = 10
    array: int = 0  # >0: an array job of this many tasks, each taking RANK/WORLD_SIZE = (index, array)
    array_parallelism: int = 256
    name: str | None = None  # job name (default: the entry)
    setup: list[str] = dataclasses.field(default_factory=list)  # shell lines before srun (module load, venv)
    requeue_overrides: list[str] | None = None  # added to a requeued run (default: train.resume=latest for training)
    sbatch: dict[str, Any] = dataclasses.field(default_factory=dict)  # extra #SBATCH flags, e.g. {exclusive: true}

    def validate(self, recipe: Any) -> None:
        for key in ("nodes", "array_parallelism"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1")
        for key in ("gpus_per_node", "max_requeues", "array", "signal_delay_s"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0")
        if self.tasks_per_node is not None:
            if self.tasks_per_node < 1:
                raise ConfigError("tasks_per_node: must be >= 1")
            if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
                raise ConfigError(
                    f"tasks_per_node={self.tasks_per_node} with gpus_per_node={self.gpus_per_node}: the launcher "
                    "runs one task per GPU (leave tasks_per_node unset, or set gpus_per_node: 0 on CPU clusters)"
                )
        limit_s = time_limit_minutes(self.time) * 60
        # slurmctld checks limits about every 30 s: a delay that close to the limit signals a requeued job
        # before its Python has even started (see docs/cluster.md)
        if self.signal_delay_s + 30 >= limit_s:
            raise ConfigError(
                f"signal_delay_s={self.signal_delay_s}: must be below the time limit ({limit_s:.0f} s) minus 30 s"
            )
        if self.cluster != "slurm" and self.nodes > 1:
            raise ConfigError(f"nodes={self.nodes}: cluster '{self.cluster}' runs on this machine only (nodes: 1)")
        if self.array and (self.nodes > 1 or self.ntasks_per_node > 1):
            raise ConfigError("array: each array task is one process (nodes: 1, one task); drop nodes/tasks_per_node")

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1


def time_limit_minutes(text: str) -> float:
    """Slurm's time formats to minutes: ``30``, ``30:00``, ``4:00:00``, ``1-12``, ``1-12:30``, ``1-12:30:00``."""
    s = str(text).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise ConfigError(f"time: {text!r} is not a Slurm time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        minutes = int(days) * 1440 + int(a) * 60 + int(b or 0) + int(c or 0) / 60
    elif c is not None:  # HH:MM:SS
        minutes = int(a) * 60 + int(b) + int(c) / 60
    elif b is not None:  # MM:SS
        minutes = int(a) + int(b) / 60
    else:
        minutes = float(a)
    if minutes <= 0:
        raise ConfigError(f"time: {text!r} must be positive")
    return minutes


def load_launch_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> LaunchConfig:
    """A launch recipe plus overrides, validated (an unknown key is a ConfigError naming it)."""
    return load_config(LaunchConfig, path, overrides)


# ---------------------------------------------------------------------------------------------------------------
# inside the job
# ---------------------------------------------------------------------------------------------------------------
def master_port(job_id: str, restarts: int) -> int:
    """A port every task of the job derives alike; it changes per restart so a requeued run never meets the
    previous run's sockets (still in TIME_WAIT). It stays below Linux's ephemeral range (32768-60999 by default),
    where gloo's pair sockets and outgoing connections take ports at random: a derived port in that range was
    found taken (EADDRINUSE) on a loaded node."""
    return 20000 + zlib.crc32(f"{job_id}:{restarts}".encode()) % 12768


def _job_env() -> Any:
    import submitit

    return submitit.JobEnvironment()


def restart_count(job_env: Any | None = None) -> int:
    """How many times this job was requeued: SLURM_RESTART_COUNT on Slurm, our counter file under LocalExecutor."""
    if os.environ.get("SLURM_JOB_ID"):
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    path = _local_counter(job_env)
    if path is not None and path.is_file():
        return int(path.read_text().strip() or 0)
    return 0


def _local_counter(job_env: Any | None) -> Path | None:
    if job_env is None or job_env.cluster != "local":
        return None
    return job_env.paths.folder / f"{job_env.job_id}_requeues"


def export_dist_env(job_env: Any, restarts: int, shard: tuple[int, int] | None = None) -> dict[str, str]:
    """Set torch.distributed/DeepSpeed variables from the job (one task per GPU); returns what was set.

    For an array task (``shard = (index, count)``) RANK/WORLD_SIZE describe the shard split only: the array tasks
    are separate jobs, so there is no process group to join.
    """
    if shard is not None:
        index, count = shard
        values = {"RANK": index, "WORLD_SIZE": count, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}
        values.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=master_port(str(job_env.job_id), restarts), LAUNCH_ARRAY=1)
    else:
        hosts = list(job_env.hostnames)
        values = {
            "MASTER_ADDR": hosts[0] if hosts else "127.0.0.1",
            "MASTER_PORT": master_port(str(job_env.job_id), restarts),
            "RANK": job_env.global_rank,
            "WORLD_SIZE": job_env.num_tasks,
            "LOCAL_RANK": job_env.local_rank,
            "LOCAL_WORLD_SIZE": max(1, job_env.num_tasks // max(1, job_env.num_nodes)),
        }
    out = {k: str(v) for k, v in values.items()}
    if shard is None:
        os.environ.pop("LAUNCH_ARRAY", None)  # inherited from a submitting array task: not ours
    os.environ.update(out)
    return out


class PreemptedNotRequeued(RuntimeError):
    """The run stopped at a preemption checkpoint but was not requeued (limit reached, or requeue failed)."""


class EntryFailed(RuntimeError):
    """The entry exited with a non-zero status."""


@dataclasses.dataclass
class EntryTask:
    """The callable submitit pickles: runs one entry in-process, with preemption handled as described above.

    Picklable on purpose (paths and strings only): it is loaded again, unchanged, when a requeued job restarts.
    """

    entry: Entry
    config: str  # the stage recipe snapshot written at submission
    overrides: list[str]
    cluster: str
    max_requeues: int
    requeue_overrides: list[str]
    shard: tuple[int, int] | None = None

    def __call__(self) -> dict[str, Any]:
        # after submitit installed its handlers, before anything slow: USR2 only sets our flag from here on.
        # SIGTERM stays with submitit (logged and ignored): on Slurm it means cancel, not "save and come back".
        preempt.install((signal.SIGUSR2,))
        job_env = _job_env()
        restarts = restart_count(job_env)
        saved_argv = list(sys.argv)
        dist_env = export_dist_env(job_env, restarts, self.shard)
        rank = int(dist_env["RANK"]) if self.shard is None else 0
        decision: dict[str, Any] = {}
        preempt.set_after_checkpoint_hook(lambda: decision.update(self._requeue(job_env, restarts, rank)))
        overrides = list(self.overrides) + (list(self.requeue_overrides) if restarts else [])
        argv = self.entry.argv(self.config, overrides)
        print(
            f"[launch] {self.entry.name} rank {dist_env['RANK']}/{dist_env['WORLD_SIZE']} node {job_env.node} "
            f"({job_env.hostname}) job {job_env.job_id} restart {restarts}: {shlex.join(argv)}",
            flush=True,
        )
        code: Any = 0
        try:
            sys.argv = [self.entry.module, *argv]
            try:
                runpy.run_module(self.entry.module, run_name="__main__", alter_sys=True)
            except SystemExit as exc:  # the entry exits through launch.dist.exit_entry
                code = exc.code
        finally:
            preempt.set_after_checkpoint_hook(None)
            sys.argv = saved_argv
        if preempt.checkpointed():
            if decision.get("requeue"):
                print(f"[launch] checkpoint written; job requeued ({decision['why']})", flush=True)
                # no result file: the watcher must not take this run for the job's end
                raise SystemExit(REQUEUE_EXIT_CODE)
            raise PreemptedNotRequeued(
                f"{self.entry.name} stopped at a preemption checkpoint and was not requeued: {decision.get('why')}. "
                "Submit the same command again to continue from the latest checkpoint."
            )
        if code not in (None, 0):
            raise EntryFailed(f"{self.entry.name} exited with status {code} (see the task logs)")
        return {
            "entry": self.entry.name,
            "rank": int(dist_env["RANK"]),
            "world_size": int(dist_env["WORLD_SIZE"]),
            "node": int(job_env.node),
            "restarts": restarts,
            "job_id": str(job_env.job_id),
        }

    def _requeue(self, job_env: Any, restarts: int, rank: int) -> dict[str, Any]:
        """The after-checkpoint hook: the same decision on every rank; rank 0 acts on it. No collectives."""
        if restarts >= self.max_requeues:
            return {"requeue": False, "why": f"max_requeues={self.max_requeues} reached"}
        why = f"restart {restarts + 1} of at most {self.max_requeues}"
        if rank != 0:
            return {"requeue": True, "why": why}
        if self.cluster == "slurm":
            job_id = str(job_env.job_id)
            try:
                subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", None) or exc
                return {"requeue": False, "why": f"scontrol requeue {job_id} failed: {detail}"}
        else:
            counter = _local_counter(job_env)
            if counter is not None:
                tmp = counter.with_suffix(".tmp")
                tmp.write_text(str(restarts + 1))
                os.replace(tmp, counter)
        return {"requeue": True, "why": why}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's Checkpointable hook. Used only if USR2 comes before :meth:`__call__` replaced submitit's
        handler (the entry has not started, so there is nothing to save). Runs inside a signal handler on rank 0
        while other ranks may be mid-collective: it must not call collectives, and does not."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# submission
# ---------------------------------------------------------------------------------------------------------------
def default_requeue_overrides(entry: Entry, cfg: LaunchConfig) -> list[str]:
    if cfg.requeue_overrides is not None:
        return list(cfg.requeue_overrides)
    return ["train.resume=latest"] if entry.trains else []


def make_executor(cfg: LaunchConfig, folder: Path, entry: Entry) -> Any:
    """The submitit executor for ``cfg.cluster`` with the job's resources."""
    import submitit

    minutes = time_limit_minutes(cfg.time)
    name = cfg.name or entry.slug
    if cfg.cluster == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=cfg.max_requeues)
        ex.update_parameters(
            timeout_min=minutes,
            tasks_per_node=cfg.ntasks_per_node,
            gpus_per_node=cfg.gpus_per_node,
            signal_delay_s=cfg.signal_delay_s,
            name=name,
        )
        if cfg.setup:
            ex.update_parameters(setup=list(cfg.setup))
        return ex
    ex = submitit.SlurmExecutor(folder, max_num_timeout=cfg.max_requeues)
    params: dict[str, Any] = {
        "job_name": name,
        "time": max(1, math.ceil(minutes)),
        "nodes": cfg.nodes,
        "ntasks_per_node": cfg.ntasks_per_node,
        "signal_delay_s": cfg.signal_delay_s,
        "array_parallelism": cfg.array_parallelism,
        # requeue must be allowed for this job whatever the cluster's JobRequeue default is
        "additional_parameters": {"requeue": True, **cfg.sbatch},
    }
    optional = {
        "partition": cfg.partition,
        "cpus_per_task": cfg.cpus_per_task,
        "mem": cfg.mem_gb,
        "constraint": cfg.constraint,
        "qos": cfg.qos,
        "account": cfg.account,
        "gpus_per_node": cfg.gpus_per_node or None,
        "setup": list(cfg.setup) or None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if "mem" in params:
        mem = float(params["mem"])
        params["mem"] = f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB"
    ex.update_parameters(**params)
    return ex


@dataclasses.dataclass
class Submission:
    """What :func:`submit` did: the submitit jobs, the run folder and the files it wrote."""

    jobs: list[Any]
    run_dir: Path
    record: Path
    stage_config: Path

    @property
    def job_ids(self) -> list[str]:
        return [str(j.job_id) for j in self.jobs]


def submit(
    entry: Entry,
    config: str | os.PathLike,
    overrides: Sequence[str] = (),
    launch: LaunchConfig | None = None,
    check: bool = True,
    command: Sequence[str] | None = None,
) -> Submission:
    """Submit ``entry`` with the stage recipe ``config`` + ``overrides`` under the launch config ``launch``.

    The stage recipe (overrides applied) is snapshotted into ``<run dir>/slurm/`` and the jobs run from that
    snapshot, so editing the recipe later changes neither queued nor requeued jobs. Logs go to
    ``<run dir>/slurm/<job id>/``.
    """
    cfg = launch or LaunchConfig()
    validate_tree(cfg)
    check_module(entry)
    tree = stage_tree(config, overrides)
    run_dir = stage_dir(tree)
    if check:
        error = check_stage_config(entry, str(config), overrides, world_size=cfg.nodes * cfg.ntasks_per_node)
        if error:
            raise ConfigError(f"{config}: {error}")
    slurm_dir = run_dir / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    snapshot = slurm_dir / f"{entry.slug}-{stamp}.yaml"
    snapshot.write_text(yaml.safe_dump(tree, sort_keys=False))

    executor = make_executor(cfg, slurm_dir / "%j", entry)
    requeue = default_requeue_overrides(entry, cfg)
    common = {
        "entry": entry,
        "config": str(snapshot),
        "overrides": [],
        "cluster": cfg.cluster,
        "max_requeues": cfg.max_requeues,
        "requeue_overrides": requeue,
    }
    if cfg.array:
        jobs = list(executor.submit_array([EntryTask(**common, shard=(i, cfg.array)) for i in range(cfg.array)]))
    else:
        jobs = [executor.submit(EntryTask(**common))]
    record = slurm_dir / f"launch-{stamp}.yaml"
    record.write_text(
        yaml.safe_dump(
            {
                "command": list(command) if command else None,
                "entry": entry.name,
                "stage_config": str(config),
                "stage_overrides": list(overrides),
                "snapshot": str(snapshot),
                "launch": to_dict(cfg),
                "job_ids": [str(j.job_id) for j in jobs],
                "logs": [str(j.paths.stdout) for j in jobs],
                "cwd": os.getcwd(),
                "submitted": datetime.datetime.now().isoformat(timespec="seconds"),
            },
            sort_keys=False,
        )
    )
    return Submission(jobs=jobs, run_dir=run_dir, record=record, stage_config=snapshot)


def follow_hints(sub: Submission, cluster: str = "slurm") -> str:
    """The commands to follow a submitted job."""
    lines = []
    for job in sub.jobs[:1]:
        jid = str(job.job_id).split("_")[0]
        if cluster == "slurm":
            lines += [
                f"  squeue -j {jid}",
                f"  sacct -j {jid} -o jobid,state,elapsed,exitcode",
                f"  scontrol show job {jid} | grep -o 'Restarts=[0-9]*'",
            ]
        lines.append(f"  tail -f {job.paths.stdout}")
        if cluster == "slurm":
            lines.append(f"  scancel {jid}    # stop without requeue")
    lines.append(f"  tensorboard --logdir {sub.run_dir / 'tensorboard'}")
    return "\n".join(lines)
