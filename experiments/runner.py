"""``python -m experiments run <yaml>``: every (arm, seed) through the project's entry points, locally or on slurm.

Per arm and seed the stages are: the synthetic set (``python -m data_prep synthetic``, built once per distinct
recipe and shared), pretraining (``-m pretrain`` under torchrun, or a slurm job through :mod:`launch.slurm`), then
each evaluation (``-m finetune``, ``--eval-only`` or a fine-tuning run). Every stage keeps its own folder::

    <out>/<name>/<arm>/seed<S>/pretrain/     the pretraining run (checkpoints, TensorBoard, summary.json)
    <out>/<name>/<arm>/seed<S>/<eval>/       each evaluation (results.json)
    <out>/<name>/<arm>/seed<S>/metrics.json  the compared metrics of this run
    <out>/_data/<hash>/                      the data sets, keyed by their recipe

A stage that finished writes ``stage.json`` (its command); a rerun skips it, and refuses, naming the folder, when
the recipe now asks for a different command there. An interrupted training stage resumes from its checkpoint
(the engine's ``train.resume: latest``). With ``keep_checkpoints: false`` a run's checkpoint folders are deleted
once all its stages are done (also on a rerun over finished runs), where a ``.safetensors`` copy of the weights
stays beside them: a sweep of many runs otherwise keeps every run's optimizer states.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.spec import Arm, EvalSpec, ExperimentSpec, arms, metric_operands
from launch.config import ConfigError, load_config
from launch.files import atomic_write_json
from launch.local import Entry, torchrun_command
from launch.recipes import schema_of

STAGE_RECORD = "stage.json"
METRICS_NAME = "metrics.json"


@dataclasses.dataclass(frozen=True)
class FlagEntry(Entry):
    """An entry with command-line flags after its recipe (``finetune --eval-only``); picklable for submitit."""

    flags: tuple[str, ...] = ()

    def argv(self, config: str, overrides: Sequence[str]) -> list[str]:
        return [*super().argv(config, overrides), *self.flags]


@dataclasses.dataclass
class Stage:
    """One command of one run: where it writes, and how to start it."""

    kind: str  # "data" | "pretrain" | eval name
    dir: Path
    entry: Entry
    config: str
    overrides: list[str]
    nproc: int

    def command(self) -> list[str]:
        if self.kind == "data":
            return [sys.executable, "-m", self.entry.module, *self.entry.argv(self.config, self.overrides)]
        # the port changes per start; the record compares the command without it
        return torchrun_command(self.entry, self.config, self.overrides, self.nproc, master_port=29500)

    def identity(self) -> dict[str, Any]:
        return {"entry": self.entry.name, "flags": list(getattr(self.entry, "flags", ())), "config": self.config,
                "overrides": self.overrides, "nproc": self.nproc}  # fmt: skip

    def done(self) -> bool:
        """True when this stage finished with the same command; a different finished command is an error."""
        record = self.dir / STAGE_RECORD
        if not record.is_file():
            return False
        old = json.loads(record.read_text()).get("identity")
        if old != self.identity():
            raise ConfigError(
                f"{self.dir} finished with another command than the recipe now asks for "
                f"(was {old}, now {self.identity()}); restore the recipe, or delete the folder to rerun it"
            )
        return True


def _fill(items: Sequence[str], values: dict[str, str]) -> list[str]:
    out = []
    for item in items:
        for key, value in values.items():
            item = item.replace("{" + key + "}", value)
        out.append(item)
    return out


def data_dir(spec: ExperimentSpec, arm: Arm) -> Path | None:
    """The data set of ``arm``: ``<out>/_data/<hash of recipe + overrides>`` (shared by arms with the same data)."""
    if spec.data is None:
        return None
    from launch.config import read_yaml

    # the recipe's content (not its comments) and the overrides name the set
    content = read_yaml(spec.data.config)
    key = json.dumps([spec.data.config, content, spec.data.overrides, arm.overrides("data")], sort_keys=True)
    return Path(spec.out) / "_data" / hashlib.sha256(key.encode()).hexdigest()[:12]


def train_shards(data: Path) -> str:
    """The brace pattern of a built split's shards (``.../train/{00000..00007}.tar``)."""
    shards = sorted((data / "train").glob("*.tar"))
    if not shards:
        raise ConfigError(f"no training shards in {data / 'train'}")
    if len(shards) == 1:
        return str(shards[0])
    return f"{data}/train/{{{shards[0].stem}..{shards[-1].stem}}}.tar"


def run_dir(spec: ExperimentSpec, arm: Arm, seed: int) -> Path:
    return Path(spec.out) / spec.name / arm.name / f"seed{seed}"


def stages(spec: ExperimentSpec, arm: Arm, seed: int) -> list[Stage]:
    """The stages of one (arm, seed) in order; ``{data}``, ``{train_shards}``, ``{run}``, ``{seed}`` filled in."""
    root = run_dir(spec, arm, seed)
    data = data_dir(spec, arm)
    values = {"run": str(root), "seed": str(seed)}
    out: list[Stage] = []
    if data is not None and spec.data is not None:
        values["data"] = str(data)
        if (data / STAGE_RECORD).is_file():  # a build that failed half-way (a full disk) is rerun, not read
            values["train_shards"] = train_shards(data)
        over = [*spec.data.overrides, *arm.overrides("data"), f"out.dir={data}"]
        out.append(Stage("data", data, Entry("data_prep", "synthetic"), spec.data.config, over, 1))
    pre = root / "pretrain"
    if spec.pretrain is not None:
        over = _fill([*spec.pretrain.overrides, *arm.overrides("pretrain")], values)
        over += [f"run.dir={pre}", f"run.seed={seed}"]
        recipe = arm.pretrain_config(spec.pretrain.config)
        out.append(Stage("pretrain", pre, Entry("pretrain"), recipe, over, spec.pretrain.nproc))
    for ev in spec.evals:
        out.append(eval_stage(spec, ev, arm, root, pre, values))
    return out


def eval_stage(spec: ExperimentSpec, ev: EvalSpec, arm: Arm, root: Path, pre: Path, values: dict[str, str]) -> Stage:
    over = _fill([*ev.overrides, *arm.overrides(ev.name)], values)
    if ev.init_from_pretrain:
        # the model section is the pretrained run's (fine-tuning inherits what the recipe leaves out from it);
        # model.* overrides of the evaluation still apply after this
        name = _pretrain_model_name(spec, arm)
        over.insert(0, f"model={json.dumps({'name': name, 'init': str(pre)})}" if name else f"model.init={pre}")
    over += [f"run.dir={root / ev.name}", f"run.seed={values['seed']}"]
    entry = FlagEntry(ev.module, None, ("--eval-only",) if ev.eval_only else ())
    return Stage(ev.name, root / ev.name, entry, ev.config, over, ev.nproc)


def arm_fingerprint(spec: ExperimentSpec, arm: Arm) -> str:
    """A hash of what defines ``arm``'s runs: each stage's entry, flags, overrides and recipe content, with the
    run folders and the seed normalized. A report stores it, so a later report can tell whether a number it
    carries from there still belongs to this recipe. Code changes are not covered: reports record the commit."""
    from launch.config import read_yaml

    plain = dataclasses.replace(spec, out="<out>")
    items = [{**st.identity(), "content": read_yaml(st.config)} for st in stages(plain, arm, 0)]
    return hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _pretrain_model_name(spec: ExperimentSpec, arm: Arm) -> str | None:
    """The pretrained model's name (recipe + overrides), so evaluation builds the same model family."""
    from launch.local import stage_tree

    assert spec.pretrain is not None
    recipe = arm.pretrain_config(spec.pretrain.config)
    model = stage_tree(recipe, [*spec.pretrain.overrides, *arm.overrides("pretrain")]).get("model")
    return str(model["name"]) if isinstance(model, dict) and model.get("name") else None


def _header(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def check_stages(spec: ExperimentSpec) -> None:
    """Refuse, before any work, a recipe whose stages would fail to start: every pretraining and evaluation recipe
    of every arm is validated with its overrides (keys and values; files made by earlier stages need not exist)."""
    problems = []
    for arm in arms(spec):
        for stage in stages(spec, arm, spec.seeds[0]):
            schema = None if stage.kind == "data" else schema_of(stage.entry.name)
            if schema is None:
                continue
            # the shards exist only once the data stage has built them; any brace pattern validates the same way
            over = [o.replace("{train_shards}", "train/{00000..00001}.tar") for o in stage.overrides]
            try:
                load_config(schema, stage.config, over, check_paths=False)
            except (ConfigError, OSError) as exc:
                problems.append(f"{arm.label}, {stage.kind} ({stage.config}): {exc}")
    if problems:
        raise ConfigError(f"{spec.name}: stages that would fail:\n  " + "\n  ".join(problems))


def check_requirements(spec: ExperimentSpec) -> None:
    """Refuse, before any work, when a required file (a trained style network, ...) is missing or untrained."""
    lines = []
    for r in spec.requires:
        path = Path(r.path)
        if not path.exists():
            lines.append(f"  needs {r.what or 'a file'} at {r.path}, which does not exist")
        else:
            header = _header(path)
            bad = {k: v for k, v in r.refuse_metadata.items() if header.get(k) == v}
            if not bad:
                continue
            lines.append(
                f"  needs {r.what or 'a file'}: {r.path} is not one ({', '.join(f'{k}={v}' for k, v in bad.items())})"
            )
        if r.make:
            lines.append(f"  make it with: {r.make}")
    if lines:
        raise ConfigError("\n".join([f"experiment {spec.name!r} cannot run: nothing was started.", *lines]))


def subprocess_env() -> dict[str, str]:
    """Offline, CPU-safe defaults for the children, the repository on PYTHONPATH; the caller's values win."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return env


def _finish(stage: Stage, seconds: float) -> None:
    atomic_write_json(
        stage.dir / STAGE_RECORD,
        {"identity": stage.identity(), "command": stage.command(), "seconds": round(seconds, 1),
         "finished": time.strftime("%Y-%m-%dT%H:%M:%S")},
    )  # fmt: skip


def run_local(stage: Stage, log_dir: Path) -> None:
    """Run one stage here, its output in ``<log_dir>/<kind>.log``; a failure names the command and the log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{stage.kind}.log"
    cmd = stage.command()
    if stage.kind != "data":
        cmd = torchrun_command(stage.entry, stage.config, stage.overrides, stage.nproc)  # a free port per start
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with log.open("a") as fh:
        code = subprocess.call(cmd, env=subprocess_env(), stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"exit status {code}: {' '.join(cmd)}\n  log: {log}\n{tail}")
    stage.dir.mkdir(parents=True, exist_ok=True)
    _finish(stage, time.perf_counter() - t0)


def run_slurm(batch: list[Stage], launch_overrides: list[str]) -> None:
    """Submit every stage of ``batch`` as a slurm job through :func:`launch.slurm.submit`, then wait for all."""
    from launch.slurm import load_launch_config, submit

    cfg = load_launch_config(None, launch_overrides)
    pending = []
    for stage in batch:
        sub = submit(stage.entry, stage.config, stage.overrides, cfg)
        print(f"submitted {stage.kind} as job {', '.join(sub.job_ids)}: {stage.dir}", flush=True)
        pending.append((stage, sub, time.perf_counter()))
    failures = []
    for stage, sub, t0 in pending:
        try:
            for job in sub.jobs:
                job.results()
            _finish(stage, time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001 - collect every failed job, then report them together
            failures.append(f"{stage.dir}: {exc}")
    if failures:
        raise RuntimeError("slurm jobs failed:\n  " + "\n  ".join(failures))


def read_metrics(spec: ExperimentSpec, arm: Arm, seed: int) -> dict[str, float]:
    """The compared metrics of one finished run, from each evaluation's ``results.json``."""
    root = run_dir(spec, arm, seed)
    by_eval = {ev.name: ev for ev in spec.evals}

    def one(metric: str) -> float:
        name, _, key = metric.partition(".")
        path = root / name / "results.json"
        results = json.loads(path.read_text())
        split = by_eval[name].metrics_from
        values = results.get("splits", {}).get(split)
        if values is None:
            raise KeyError(f"{path}: no split {split!r} (has {sorted(results.get('splits', {}))})")
        if key not in values:
            raise KeyError(f"{path}: splits.{split} has no metric {key!r} (has {sorted(values)})")
        return float(values[key])

    out: dict[str, float] = {}
    for metric in spec.metrics:
        first, *rest = (one(m) for m in metric_operands(metric))
        out[metric] = first - rest[0] if rest else first
    return out


def _pending(spec: ExperimentSpec, arm: Arm, seed: int, index: int, built: set[Path]) -> Stage | None:
    # stages are listed again each time: {train_shards} is known only once the data stage has built the set
    stage = stages(spec, arm, seed)[index]
    if (stage.kind == "data" and stage.dir in built) or stage.done():
        return None
    return stage


def run(
    spec: ExperimentSpec,
    only_arms: Sequence[str] = (),
    dry_run: bool = False,
    carried: Mapping[tuple[str, int], str] | None = None,
) -> list[dict[str, Any]]:
    """Run every (arm, seed) not yet finished; returns one row per run (arm, seed, metrics, seconds).
    ``carried``: ``(arm name, seed)`` whose numbers an earlier report holds (:func:`report.carried_runs`), not run.

    Locally, one run after the other (seed-major, so a stopped experiment has every arm of its first seeds);
    on slurm, stage kind by stage kind: every pending pretraining job at once, then every evaluation.
    """
    check_requirements(spec)
    check_stages(spec)
    selected = [a for a in arms(spec) if not only_arms or a.name in only_arms]
    if only_arms and len(selected) != len(set(only_arms)):
        known = [a.name for a in arms(spec)]
        raise ConfigError(f"--arm: {sorted(set(only_arms) - {a.name for a in selected})} not among {known}")
    carried = carried or {}
    for arm, seed in [(a, s) for s in spec.seeds for a in selected if (a.name, s) in carried]:
        print(f"not run, carried: {arm.label}, seed {seed}: {carried[(arm.name, seed)]}", flush=True)
    plan = [(arm, seed) for seed in spec.seeds for arm in selected if (arm.name, seed) not in carried]
    if not plan:
        return []
    n_stages = len(stages(spec, plan[0][0], plan[0][1]))
    built: set[Path] = set()
    seconds: dict[tuple[str, int], float] = {}
    if spec.launcher == "slurm" and not dry_run:
        for index in range(n_stages):
            batch = []
            for arm, seed in plan:
                stage = _pending(spec, arm, seed, index, built)
                if stage is None:
                    continue
                if stage.kind == "data":  # seconds of CPU: built here, not as a job
                    run_local(stage, stage.dir.parent)
                    built.add(stage.dir)
                else:
                    batch.append(stage)
            if batch:
                run_slurm(batch, spec.slurm)
    else:
        for arm, seed in plan:
            t0 = time.perf_counter()
            for index in range(n_stages):
                stage = _pending(spec, arm, seed, index, built)
                if stage is None:
                    continue
                if dry_run:
                    print("would run: " + " ".join(stage.command()))
                    if stage.kind == "data":
                        built.add(stage.dir)
                    continue
                run_local(stage, stage.dir.parent if stage.kind == "data" else run_dir(spec, arm, seed))
                if stage.kind == "data":
                    built.add(stage.dir)
                seconds[(arm.name, seed)] = round(time.perf_counter() - t0, 1)
            if not dry_run:
                _record(spec, arm, seed, seconds.get((arm.name, seed)))
    if dry_run:
        return []
    if spec.launcher == "slurm":
        return [_record(spec, arm, seed, None) for arm, seed in plan]
    return [json.loads((run_dir(spec, a, s) / METRICS_NAME).read_text()) for a, s in plan]


def drop_checkpoints(root: Path) -> int:
    """Delete ``checkpoints/`` of every finished stage under ``root`` that keeps a ``.safetensors`` copy of its
    weights (an export, a best model); returns the bytes freed. Stages without such a copy keep theirs."""
    import shutil

    freed = 0
    for ckpts in sorted(root.glob("*/checkpoints")):
        stage = ckpts.parent
        if not (stage / STAGE_RECORD).is_file() or not any(stage.glob("*.safetensors")):
            continue
        size = sum(f.stat().st_size for f in ckpts.rglob("*") if f.is_file())
        shutil.rmtree(ckpts)
        freed += size
        print(f"dropped {ckpts} ({size / 2**20:.0f} MiB; keep_checkpoints: false)", flush=True)
    return freed


def _record(spec: ExperimentSpec, arm: Arm, seed: int, seconds: float | None) -> dict[str, Any]:
    """Read one finished run's metrics, keep them in its ``metrics.json`` and print them."""
    metrics = read_metrics(spec, arm, seed)
    if not spec.keep_checkpoints:
        drop_checkpoints(run_dir(spec, arm, seed))
    path = run_dir(spec, arm, seed) / METRICS_NAME
    row: dict[str, Any] = {"arm": arm.name, "label": arm.label, "seed": seed, "metrics": metrics}
    if seconds is not None or not path.is_file():
        row["seconds"] = seconds
        atomic_write_json(path, row)
    print(f"{arm.label} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)
    return row
