"""The one training loop shared by pretraining and every fine-tuning task, driving DeepSpeed directly.

Usage (see docs/pretrain.md)::

    env = init_distributed()                       # before building the loader (it needs rank/world size)
    model = build(cfg.model); load_init(model, cfg.model.init)
    loader = ShardLoader(cfg.data, seed=cfg.run.seed, rank=env.rank, world_size=env.world_size)
    augment = build_mixgen(cfg.mixgen, seed=cfg.run.seed, rank=env.rank)   # None when mixgen.enabled is false
    summary = Trainer(cfg, model, loader, augment=augment, evaluate=fn, eval_every=500).fit()

``cfg`` needs the sections ``run``, ``train``, ``deepspeed``, ``data`` (for ``batch_size``, ``mean``/``std``).
What the model must and may provide is spelled out in :mod:`pretrain.protocol` (``forward`` returning
``{"loss", "losses"}``; optional ``commit_step``/``discard_step``, ``after_optimizer_step``, ``no_weight_decay``,
``has_momentum``, ``configure``, ``images_to_log``, ``on_train_end``). The batch augmentation (MixGen) is a callable
``augment(batch, step=, micro=)`` passed in, as timm passes ``mixup_fn``.

Why not Accelerate: ``Accelerator.save_state`` writes registered custom objects (our loader position) from the
main process only, so the other ranks' loader positions would be lost, and ``load_state`` unpickles them with
``weights_only=False``; it also hides the DeepSpeed engine calls we need for the agreed non-finite skip (no
backward, no step on any rank). DeepSpeed's own ``save_checkpoint(client_state=...)`` carries every rank's
loader and RNG state (gathered to rank 0) with the engine, optimizer and scheduler state in one commit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launch import preempt
from launch.config import ConfigError, deep_merge, save_config
from launch.dist import init_distributed
from launch.files import atomic_write_bytes, atomic_write_json
from launch.rng import rng_state, seed_everything, set_rng_state
from pretrain.flops import ForwardFlops, mfu, training_flops_per_sample
from pretrain.protocol import (
    AfterOptimizerStep,
    BatchAugment,
    ConfigAware,
    ImageLogging,
    StepState,
    TrainEnd,
    WeightDecayExempt,
)

log = logging.getLogger("vlp.engine")

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"  # written into a tag folder once every rank has saved it
KILL_AFTER_STEP_ENV = "VLP_KILL_AFTER_STEP"  # test hook: every rank SIGKILLs itself after this step

Evaluate = Callable[[nn.Module, int], dict[str, Any]]


@contextlib.contextmanager
def explain_save_errors(folder: Path) -> Any:
    """Re-raise a failed checkpoint write as one message naming the folder and the free space there.

    A full disk surfaces from torch's writer as ``basic_ios::clear: iostream error`` or ``unexpected pos``; the
    half-written tag has no completion marker, so a resume skips it.
    """
    try:
        yield
    except (OSError, RuntimeError) as exc:
        probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        free = shutil.disk_usage(probe).free
        cause = (str(exc).splitlines() or [""])[0][:200]
        raise RuntimeError(
            f"checkpoint {folder} could not be written ({type(exc).__name__}: {cause}); "
            f"{free / 2**20:.0f} MiB free on its filesystem. Free space, lower train.keep_checkpoints, or raise "
            "train.checkpoint_every; the run resumes from its last complete checkpoint"
        ) from exc


class NonFiniteLossError(RuntimeError):
    """Raised on every rank together after ``train.max_nonfinite`` consecutive non-finite losses."""


# --------------------------------------------------------------------------------------------------------------
# optimizer, schedule, DeepSpeed config


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only; none on biases, norms, 1-D params, the temperature and names
    the model lists in ``no_weight_decay()``."""
    skip = set(model.no_weight_decay()) if isinstance(model, WeightDecayExempt) else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lowered = name.lower()
        if (
            p.ndim < 2
            or name in skip
            or lowered.endswith(".bias")
            or "logit_scale" in lowered
            or "temp" in lowered.rsplit(".", 1)[-1]
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def cosine_with_warmup(warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor of update ``s`` (0-based): linear warm-up to 1 over ``warmup_steps``, then cosine to ``min_ratio``
    at ``max_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict derived from ``cfg.train``/``cfg.data``/``cfg.deepspeed`` (``extra`` merged last)."""
    micro = int(cfg.data.batch_size)
    accum = int(cfg.train.grad_accum)
    ds = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(cfg.train.grad_clip),
        "zero_optimization": {"stage": int(cfg.deepspeed.zero_stage)},
        "bf16": {"enabled": bool(cfg.deepspeed.bf16)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our monitor logs; DeepSpeed's own print would interleave with tqdm
        "wall_clock_breakdown": False,
    }
    return deep_merge(ds, dict(cfg.deepspeed.extra or {}))


# --------------------------------------------------------------------------------------------------------------
# checkpoint discovery


def _complete_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    tags = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.is_dir() and p.name.startswith("step") and (p / COMPLETE).is_file():
                with contextlib.suppress(ValueError):
                    tags.append((int(p.name[4:]), p.name))
    return sorted(tags)


def find_resume(resume: str, run_dir: Path) -> tuple[Path, str] | None:
    """(checkpoints folder, tag) to resume from, or None for a fresh start.

    ``latest``: the newest complete checkpoint under ``run_dir/checkpoints`` (none yet: fresh start). A path: a
    checkpoints folder (its newest complete tag) or one tag folder. ``none``: fresh start.
    """
    if resume in ("", "none"):
        return None
    if resume == "latest":
        tags = _complete_tags(run_dir / CHECKPOINTS)
        return (run_dir / CHECKPOINTS, tags[-1][1]) if tags else None
    path = Path(resume)
    if (path / COMPLETE).is_file():
        return path.parent, path.name
    for folder in (path / CHECKPOINTS, path):
        tags = _complete_tags(folder)
        if tags:
            return folder, tags[-1][1]
    raise ConfigError(f"train.resume: no complete checkpoint in {path} (expected step<N>/{COMPLETE})")


RESUME_META = "trainer.json"  # written into each tag folder: what a resume must match (read before loading)


def _model_signature(model: Any) -> dict[str, Any]:
    """The model section minus weight sources (``init``, ``pretrained``), which a resumed run takes from the
    checkpoint anyway."""
    tree = dataclasses.asdict(model) if dataclasses.is_dataclass(model) else dict(model or {})

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in ("init", "pretrained")}
        if isinstance(node, (list, tuple)):
            return [strip(v) for v in node]
        return node

    return strip(tree)


def resume_meta(cfg: Any, world_size: int) -> dict[str, Any]:
    """What a checkpoint must agree on with the run that resumes it (exact resume restores per-rank loader
    positions and RNG states, and DeepSpeed's optimizer partitions, all tied to these values)."""
    return {
        "world_size": int(world_size),
        "data.batch_size": int(cfg.data.batch_size),
        "train.grad_accum": int(cfg.train.grad_accum),
        "model": _model_signature(cfg.model),
    }


def _saved_meta(folder: Path, tag: str) -> dict[str, Any] | None:
    meta = folder / tag / RESUME_META
    if meta.is_file():
        return json.loads(meta.read_text())
    saved = folder.parent / "config.yaml"  # checkpoints written before trainer.json: the run's resolved recipe
    if folder.name == CHECKPOINTS and saved.is_file():
        import yaml

        tree = yaml.safe_load(saved.read_text()) or {}
        data, train = tree.get("data") or {}, tree.get("train") or {}
        return {
            "data.batch_size": data.get("batch_size"),
            "train.grad_accum": train.get("grad_accum"),
            "model": _model_signature(tree.get("model")),
        }
    return None


def check_resume(cfg: Any, world_size: int) -> tuple[Path, str] | None:
    """The checkpoint ``train.resume`` selects, after checking it was written with this run's world size, batch
    size and model; a mismatch is a ConfigError naming the saved and the new value and the two ways out.

    Called before process groups start and again before DeepSpeed loads anything.
    """
    found = find_resume(str(cfg.train.resume), Path(cfg.run.dir))
    if found is None:
        return None
    saved = _saved_meta(*found)
    if saved is None:
        return found
    new = resume_meta(cfg, world_size)
    where = found[0] / found[1]
    out = "set train.resume=none to start from scratch, or choose a new run.dir"
    for key in ("world_size", "data.batch_size", "train.grad_accum"):
        if saved.get(key) is not None and saved[key] != new[key]:
            name = "world size (processes)" if key == "world_size" else key
            raise ConfigError(
                f"train.resume: {where} was saved with {name}={saved[key]}, this run has {name}={new[key]}; exact "
                f"resume needs the same value: {out}"
            )
    if saved.get("model") and saved["model"] != new["model"]:
        old, cur = saved["model"], new["model"]
        diff = sorted(k for k in set(old) | set(cur) if old.get(k) != cur.get(k))
        shown = ", ".join(f"model.{k}={old.get(k)!r} -> {cur.get(k)!r}" for k in diff[:3])
        raise ConfigError(f"train.resume: {where} holds another model ({shown}); {out}")
    return found


# --------------------------------------------------------------------------------------------------------------
# the trainer


@dataclasses.dataclass
class _Window:
    """Timings accumulated between two logged steps."""

    skipped_base: int | None = None  # the loader's cumulative skipped-sample count when the window opened
    time: float = 0.0
    data: float = 0.0
    steps: int = 0

    def add(self, step_time: float, data_time: float) -> None:
        self.time += step_time
        self.data += data_time
        self.steps += 1


def match_norm_buffers(module: nn.Module) -> None:
    """Give batch-norm running statistics the dtype of their layer's weight.

    DeepSpeed's bf16 mode casts parameters, not buffers, so a CNN tower would meet bf16 weights beside fp32 running
    statistics and fail in ``batch_norm``. Layers whose weights stay fp32 (momentum encoders) keep fp32 statistics.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            for name in ("running_mean", "running_var"):
                buf = getattr(m, name, None)
                if buf is not None and buf.dtype != m.weight.dtype:
                    setattr(m, name, buf.to(m.weight.dtype))


@dataclasses.dataclass
class _State:
    step: int = 0  # optimizer updates done
    epoch: int = 0  # loader passes completed
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0
    samples: int = 0  # samples trained on (all ranks)


class Trainer:
    """DeepSpeed training loop with exact resume, agreed non-finite skipping, preemption and rank-0 logging.

    ``loader``: an iterable of batch dicts (``image``, ``text`` list, ...); if it has ``state_dict()`` /
    ``load_state_dict()`` its position is checkpointed per rank, its ``steps_per_epoch`` (micro-batches per pass)
    becomes ``batch["updates_per_epoch"]`` (divided by ``train.grad_accum``), and ``set_epoch(n)`` is called when a
    pass ends. ``augment`` (:class:`~pretrain.protocol.BatchAugment`, e.g. MixGen) rewrites every training
    micro-batch before the forward. ``evaluate(module, step)`` runs
    on every rank every ``eval_every`` steps and after the last one; its dict is logged as ``eval/<name>``.
    """

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        loader: Iterable[dict[str, Any]],
        *,
        augment: BatchAugment | None = None,
        evaluate: Evaluate | None = None,
        eval_every: int | None = None,
        groups: list[dict[str, Any]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.loader = loader
        self.augment = augment
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / CHECKPOINTS
        self.env = init_distributed()
        self.rank, self.world = self.env.rank, self.env.world_size
        preempt.install()
        if isinstance(model, ConfigAware):
            model.configure(cfg)  # a model that adopts recipe keys beyond its own section (mean/std, seed)
        seed_everything(int(cfg.run.seed) + self.rank)
        self.engine = self._build_engine(model, groups)
        self.state = _State()
        self.resumed_from: str | None = None
        self._iter = None
        self._data_time = 0.0
        self._batch_skipped = 0  # from batch["skipped"], for loaders without a cumulative ``skipped`` counter
        self.last_eval: dict[str, Any] = {}
        self.extra_summary: dict[str, Any] = {}  # what the model's on_train_end hook returned
        self.flops = ForwardFlops()
        self.flops_per_sample: float | None = None
        self._restore()

    # -- setup ------------------------------------------------------------------------------------------------
    def _build_engine(self, model: nn.Module, groups: list[dict[str, Any]] | None):
        import deepspeed

        tc = self.cfg.train
        groups = groups if groups is not None else param_groups(model, tc.weight_decay)
        optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
        factor = cosine_with_warmup(tc.warmup_steps, tc.max_steps, tc.min_lr / tc.lr if tc.lr > 0 else 0.0)
        self.ds_config = deepspeed_config(self.cfg, self.world)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor),
            config=self.ds_config,
            dist_init_required=False,
        )
        if self.cfg.deepspeed.bf16:
            match_norm_buffers(engine.module)
        return engine

    @property
    def module(self) -> nn.Module:
        """The wrapped model (for evaluation and export)."""
        return self.engine.module

    def _restore(self) -> None:
        found = check_resume(self.cfg, self.world)
        if found is None:
            return
        folder, tag = found
        path, client = self.engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise RuntimeError(f"train.resume: DeepSpeed could not load checkpoint {folder / tag}")
        self.state = _State(**client["trainer"])
        mine = client["ranks"][self.rank]
        if mine.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(mine["loader"])
        set_rng_state(mine["rng"])
        # the count depends on the micro-batch it was taken on (text length): a resumed run keeps the run's number
        self.flops_per_sample = client.get("flops_per_sample")
        self.resumed_from = str(folder / tag)
        if self.rank == 0:
            log.info("resumed from %s at step %d", self.resumed_from, self.state.step)

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Save a checkpoint on all ranks (collective); keeps the newest ``train.keep_checkpoints``."""
        tag = f"step{self.state.step}"
        started = time.perf_counter()
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        mine = {"loader": loader_state, "rng": rng_state()}
        ranks: list[Any] = [None] * self.world
        dist.all_gather_object(ranks, mine)
        client = {"trainer": dataclasses.asdict(self.state), "ranks": ranks, "world_size": self.world,
                  "flops_per_sample": self.flops_per_sample}  # fmt: skip
        with explain_save_errors(self.ckpt_dir / tag):
            self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            atomic_write_json(self.ckpt_dir / tag / RESUME_META, resume_meta(self.cfg, self.world))
            atomic_write_bytes(self.ckpt_dir / tag / COMPLETE, b"")
            atomic_write_bytes(self.ckpt_dir / "latest", tag.encode())  # what DeepSpeed's own tooling reads
            keep = max(1, int(getattr(self.cfg.train, "keep_checkpoints", 3)))
            for _, old in _complete_tags(self.ckpt_dir)[:-keep]:
                shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
            log.info("checkpoint saved: %s (%.1f s)", self.ckpt_dir / tag, time.perf_counter() - started)
        dist.barrier()
        return self.ckpt_dir / tag

    # -- the loop -----------------------------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, Any]:
        if self._iter is not None:
            try:
                return next(self._iter)
            except StopIteration:
                self.state.epoch += 1
                if hasattr(self.loader, "set_epoch"):
                    self.loader.set_epoch(self.state.epoch)
        # A new pass. A DataLoader draws its workers' base seed from the global RNG when its iterator starts (often
        # inside the first next() of a generator-based loader); a resumed run starts one right after restoring that
        # RNG, which would shift every later dropout mask. Starting a pass leaves the model's RNG stream as it was.
        with torch.random.fork_rng(devices=[]):
            self._iter = iter(self.loader)
            try:
                return next(self._iter)
            except StopIteration:
                raise RuntimeError("the training loader yielded no batch in a whole pass") from None

    def close_loader(self) -> None:
        """Stop the loader's worker processes now (an abandoned iterator would stall interpreter exit)."""
        it, self._iter = self._iter, None
        close = getattr(it, "close", None)
        if callable(close):
            close()

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        device = self.engine.device
        bf16 = bool(self.cfg.deepspeed.bf16)
        out = {}
        for k, v in batch.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device, non_blocking=True)
                if bf16 and v.is_floating_point():
                    v = v.to(torch.bfloat16)
            out[k] = v
        return out

    def _agree(self, loss: torch.Tensor, losses: dict[str, Any]) -> tuple[bool, bool, float, dict[str, float]]:
        """One all-reduce: (any rank non-finite, any rank asked to stop, mean loss, mean objectives)."""
        names = sorted(losses)
        values = [loss.detach().float().reshape(())] + [
            torch.as_tensor(losses[n]).detach().float().reshape(()) for n in names
        ]
        finite = all(bool(torch.isfinite(v)) for v in values)
        vec = torch.tensor(
            [0.0 if finite else 1.0, 1.0 if preempt.requested() else 0.0]
            + [v.item() if finite else 0.0 for v in values],
            dtype=torch.float64,
        )
        if self.world > 1:
            dist.all_reduce(vec)
        vec[2:] /= self.world
        means = vec[2:].tolist()
        return bool(vec[0] > 0), bool(vec[1] > 0), means[0], dict(zip(names, means[1:]))

    def _micro_batches(self, preempted: bool) -> tuple[list[tuple[float, dict[str, float], Any, float]], Any, bool]:
        """Forward/backward ``train.grad_accum`` finite micro-batches (one optimizer update).

        Returns ([(mean loss, mean objectives, logit_scale, lr)], (raw, mixed) first batch, preemption flag).
        A batch whose loss is non-finite on any rank is skipped by every rank (no backward, no step) and replaced
        by the next one; ``train.max_nonfinite`` such batches in a row raise :class:`NonFiniteLossError` on
        every rank at the same point.
        """
        tc = self.cfg.train
        accum = int(tc.grad_accum)
        per_epoch = getattr(self.loader, "steps_per_epoch", None)
        # ALBEF's alpha ramp and similar schedules count optimizer updates: an epoch is per_epoch / accum of them
        updates_per_epoch = per_epoch / accum if per_epoch else None
        module = self.module
        results: list[tuple[float, dict[str, float], Any, float]] = []
        first = None
        micro = 0  # micro-batches drawn for this update, skipped ones included: each gets its own augmentation
        while len(results) < accum:
            td = time.perf_counter()
            raw = self._next_batch()
            self._data_time += time.perf_counter() - td
            self._batch_skipped += int(raw.get("skipped", 0) or 0)
            raw["step"], raw["micro"], raw["updates_per_epoch"] = self.state.step, micro, updates_per_epoch
            micro += 1
            batch = raw if self.augment is None else self.augment(raw, step=self.state.step, micro=raw["micro"])
            device_batch = self._to_device(batch)
            if self.flops_per_sample is None:
                with self.flops.count():  # once per run: the forward FLOPs of one micro-batch
                    out = self.engine(device_batch)
                self.flops_per_sample = training_flops_per_sample(self.flops.total, len(batch["image"]))
            else:
                out = self.engine(device_batch)
            bad, stop, loss, objectives = self._agree(out["loss"], out.get("losses", {}))
            preempted = preempted or stop
            if isinstance(module, StepState):
                # model state (queues) changes only for a batch every rank agreed to train on
                if bad:
                    module.discard_step()
                else:
                    module.commit_step()
            if bad:
                del out
                self.state.nonfinite_total += 1
                self.state.nonfinite_consecutive += 1
                log.warning(
                    "step %d: non-finite loss on at least one rank, batch skipped by all (%d in a row, %d total)",
                    self.state.step, self.state.nonfinite_consecutive, self.state.nonfinite_total,
                )  # fmt: skip
                if self.state.nonfinite_consecutive >= int(tc.max_nonfinite):
                    raise NonFiniteLossError(
                        f"{self.state.nonfinite_consecutive} consecutive non-finite losses at step "
                        f"{self.state.step} (train.max_nonfinite={tc.max_nonfinite}); stopping. Lower train.lr, "
                        "use deepspeed.bf16 rather than fp16, or inspect the data of this step."
                    )
                continue
            self.state.nonfinite_consecutive = 0
            lr = self.engine.get_lr()[0]  # the rate this update uses: step() advances the schedule
            self.engine.backward(out["loss"])
            self.engine.step()
            results.append((loss, objectives, out.get("logit_scale"), lr))
            if first is None:
                first = (raw, batch)
            del out
        return results, first, preempted

    def fit(self) -> dict[str, Any]:
        """Train to ``train.max_steps`` (or until preempted); returns the summary (also ``run.dir/summary.json``)."""
        from pretrain.monitor import Monitor

        cfg, tc = self.cfg, self.cfg.train
        image_log_every = int(self.augment.image_log_every or 0) if self.augment is not None else 0
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        monitor = Monitor(self.run_dir, active=self.rank == 0, start_step=self.state.step, total_steps=tc.max_steps)
        kill_after = int(os.environ.get(KILL_AFTER_STEP_ENV, "0") or 0)
        global_b = int(cfg.data.batch_size) * int(tc.grad_accum) * self.world
        start_step, t_start = self.state.step, time.perf_counter()
        window = _Window(skipped_base=self._loader_skipped())
        preempted = False
        last_grad_norm = None
        try:
            while self.state.step < tc.max_steps:
                t0 = time.perf_counter()
                self._data_time = 0.0
                results, (raw, mixed), preempted = self._micro_batches(preempted)
                if isinstance(self.module, AfterOptimizerStep):
                    self.module.after_optimizer_step()  # e.g. CLIP's temperature clamp, ALBEF's momentum update
                self.state.step += 1
                self.state.samples += global_b
                self.state.epoch = int(getattr(self.loader, "epoch", self.state.epoch))
                step = self.state.step
                gn = self.engine.get_global_grad_norm()
                last_grad_norm = float(gn) if gn is not None else None
                window.add(time.perf_counter() - t0, self._data_time)

                if step % max(1, int(tc.log_every)) == 0 or step in (1, tc.max_steps):
                    self._log_step(monitor, step, results, window, global_b, last_grad_norm)
                    window = _Window(skipped_base=self._loader_skipped())
                if image_log_every and step % image_log_every == 0:
                    self._log_mixgen(monitor, step, raw, mixed)
                if isinstance(self.module, ImageLogging):
                    images = self.module.images_to_log()  # the model decides when; [N,3,H,W] in [0, 1] per tag
                    if images:
                        monitor.image_grids(step, images)
                if self.evaluate is not None and self.eval_every and step < tc.max_steps:
                    if step % int(self.eval_every) == 0:
                        self._run_eval(monitor, step)
                checkpoint_due = bool(tc.checkpoint_every) and step % int(tc.checkpoint_every) == 0
                if preempted or checkpoint_due or step >= tc.max_steps:
                    self.save_checkpoint()
                if kill_after and step == kill_after:
                    # test hook: a hard crash of the whole job right after this step (every rank, no cleanup)
                    monitor.flush()
                    dist.barrier()
                    os.kill(os.getpid(), signal.SIGKILL)
                if preempted:
                    log.warning("preemption requested: checkpoint of step %d written, stopping", step)
                    break
            if not preempted and self.state.step > start_step and self.evaluate is not None:
                self._run_eval(monitor, self.state.step)
            if not preempted and self.state.step >= tc.max_steps and isinstance(self.module, TrainEnd):
                # e.g. the style network's stage checkpoint
                self.extra_summary = dict(self.module.on_train_end(self.run_dir) or {})
                dist.barrier()
        finally:
            monitor.close()
            self.close_loader()
        summary = self._finish(start_step, time.perf_counter() - t_start, preempted, last_grad_norm)
        if preempted:
            preempt.after_checkpoint()
        return summary

    def _loader_skipped(self) -> int | None:
        value = getattr(self.loader, "skipped", None)
        return int(value) if isinstance(value, int) else None

    # -- logging ----------------------------------------------------------------------------------------------
    def _log_step(self, monitor, step, step_losses, window, global_b, grad_norm) -> None:
        loss = sum(x[0] for x in step_losses) / len(step_losses)
        names = step_losses[0][1].keys()
        objectives = {n: sum(x[1][n] for x in step_losses) / len(step_losses) for n in names}
        secs = max(window.time, 1e-9)
        sps = global_b * window.steps / secs
        now = self._loader_skipped()
        if now is not None and window.skipped_base is not None:
            skipped = now - window.skipped_base
        else:
            skipped, self._batch_skipped = self._batch_skipped, 0
        lr = step_losses[-1][3]
        scalars = {
            "loss": loss,
            **objectives,
            "lr": lr,
            "grad_norm": grad_norm,
            "samples_per_s": sps,
            "samples_per_s_per_gpu": sps / self.world,
            "data_time": window.data / max(1, window.steps),
            "step_time": secs / max(1, window.steps),
            "skipped_samples": skipped,
            "nonfinite_total": self.state.nonfinite_total,
            "epoch": self.state.epoch,
        }
        scale = step_losses[-1][2]
        if scale is not None:
            scalars["logit_scale"] = float(scale)
        compute: dict[str, float] = {}
        if self.flops_per_sample is not None:
            compute["flops_per_sample"] = self.flops_per_sample
            util = mfu(self.flops_per_sample, sps / self.world, float(self.cfg.train.peak_flops))
            if util is not None:
                compute["mfu"] = util
        monitor.scalars(step, {**scalars, **compute})
        monitor.jsonl(
            {"step": step, "loss": loss, **objectives, "lr": lr, "samples_per_s": sps, "grad_norm": grad_norm,
             **compute}
        )  # fmt: skip
        if monitor.has_progress_bar:
            monitor.progress(step, {"loss": loss, "lr": lr, "sps": sps})
        elif self.rank == 0:
            log.info(
                "step %d/%d loss %.4f %s lr %.3g %.1f samples/s",
                step, self.cfg.train.max_steps, loss,
                " ".join(f"{k} {v:.4f}" for k, v in objectives.items()), lr, sps,
            )  # fmt: skip

    def _log_mixgen(self, monitor, step: int, raw: dict[str, Any], mixed: dict[str, Any]) -> None:
        info = mixed.get("mixgen_rows")
        if self.rank != 0 or not info or len(info["rows"]) == 0:
            return
        rows, partners = info["rows"][:8], info["partners"][:8]
        monitor.image_pairs(
            step,
            raw["image"][rows],
            raw["image"][partners],
            mixed["image"][rows],
            [mixed["text"][i] for i in rows.tolist()],
            self.cfg.data.mean,
            self.cfg.data.std,
        )

    def _run_eval(self, monitor, step: int) -> None:
        module = self.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            metrics = self.evaluate(module, step) or {}
        module.train(was_training)
        monitor.eval_metrics(step, metrics)
        self.last_eval = metrics

    def _finish(self, start_step: int, seconds: float, preempted: bool, grad_norm: float | None) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "steps": self.state.step,
            "steps_this_run": self.state.step - start_step,
            "seconds": seconds,
            "samples_per_s": (self.state.step - start_step)
            * int(self.cfg.data.batch_size)
            * int(self.cfg.train.grad_accum)
            * self.world
            / max(seconds, 1e-9),
            "world_size": self.world,
            "nonfinite_total": self.state.nonfinite_total,
            "resumed_from": self.resumed_from,
            "preempted": preempted,
            "last_grad_norm": grad_norm,
            "flops_per_sample": self.flops_per_sample,
            "tensorboard": str(self.run_dir / "tensorboard"),
        }
        if self.last_eval:
            summary["eval"] = self.last_eval
        summary.update(self.extra_summary)
        export_state = None
        if bool(self.cfg.train.export) and not preempted:
            export_state = self._consolidated_state()
        if self.rank == 0:
            rows = _read_jsonl(self.run_dir / "metrics.jsonl")
            losses = [r["loss"] for r in rows if r.get("loss") is not None]
            summary["first_loss"] = losses[0] if losses else None
            summary["last_loss"] = losses[-1] if losses else None
            if export_state is not None:
                from pretrain.export import export_safetensors

                opts = self.cfg.model
                meta = {
                    "model": dataclasses.asdict(opts) if dataclasses.is_dataclass(opts) else opts,
                    "step": self.state.step,
                }
                export_safetensors(export_state, self.run_dir / "export.safetensors", meta)
                summary["export"] = str(self.run_dir / "export.safetensors")
            atomic_write_json(self.run_dir / "summary.json", summary)
        dist.barrier()
        return summary

    def _consolidated_state(self) -> dict[str, torch.Tensor] | None:
        """Full module weights on rank 0 (a collective under ZeRO-3, where each rank holds a shard)."""
        if int(self.cfg.deepspeed.zero_stage) == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
            return state if self.rank == 0 else None
        return self.module.state_dict() if self.rank == 0 else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows
