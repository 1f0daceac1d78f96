"""One pretraining step of every model (CLIP, ViLT, ALBEF, TCL) with MixGen off and on; momentum/queue cost.

    python bench/pretrain_step.py [--models clip,vilt,albef,tcl] [--batch 16] [--warmup 3] [--reps 10]
                                  [--device cpu|cuda] [--bf16] [--json out.json]

Each model is built from the ``model`` section of its ``configs/pretrain/<name>_tiny.yaml`` recipe through the
registry and measured in a fresh subprocess (so one model's allocator state and peak memory do not leak into the
next). Every model gets the same batch content: ``--batch`` images of the built-in synthetic set
(``data_prep.sources.synthetic.make_example``, rendered at the recipe's ``model.image_size``, first caption each,
cleaned by ``pre_caption``), normalized with the recipe's mean/std by the deterministic square-resize transform;
TCL's second view is the recipe's random-crop training transform of the same image. A few such batches are
built up front and cycled, so decoding and augmentation are not timed.

A step is what the engine does per update, without DeepSpeed: ``apply_mixgen`` (MixGen on only, on the CPU
batch, as the engine does before moving it to the device) -> device copy -> forward -> backward -> gradient
clipping (``train.grad_clip``) -> AdamW step (the engine's parameter groups, recipe lr/betas/weight decay) ->
``zero_grad`` -> ``after_optimizer_step()``. After ``--warmup`` pairs of steps, ``--reps`` repetitions each run
one step with MixGen off and one with it on, on the same batch, the order alternating every repetition so that
drifts in machine load hit both modes equally. Times are medians. ``--control`` adds a third mode (MixGen's
images, the original captions) to separate the mixing from the longer captions it makes.

MixGen's overhead is reported two ways: ``(on - off) / off`` of the median step times (includes the longer,
concatenated captions that pad the text batch to more tokens, but is noisy at the 0.5 % target), and the
median time of the ``apply_mixgen`` call itself, measured inside each MixGen-on step, divided by the median step
time off. For ALBEF/TCL the momentum EMA (``momentum_update``) and the feature queues (``queues.get`` +
``queues.enqueue``) are timed by wrapping those methods on the built instance (the model files are untouched);
on CUDA the wrappers record CUDA events, so they add no synchronisation.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` per step (reset before each step), median per mode, i.e.
the tensors' peak (weights, gradients, optimizer state, activations), not the caching allocator's reserve. On
CPU the process's peak resident set size (``VmHWM``) is reset through ``/proc/self/clear_refs`` once the model,
optimizer and batches are built, and the growth ``VmHWM(after all steps) - VmRSS(at reset)`` is reported: the
memory the steps needed from the OS (activations, gradients, AdamW state created at the first step, allocator
caching), one number covering both modes. Prints tables; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

MODELS = ("clip", "vilt", "albef", "tcl")
MIB = 1024.0 * 1024.0


# ------------------------------------------------------------------------------------------------ batches


def make_batches(cfg: Any, batch: int, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` batches of ``batch`` synthetic image-caption pairs at the recipe's model image size.

    ``image``: square resize + the recipe's normalization; ``image2`` (when ``data.views`` is 2): the recipe's
    random-crop training view of the same image, from a fixed generator.
    """
    from data_prep.sources.synthetic import make_example
    from data_prep.transforms import eval_transform, pre_caption, train_transform

    size = int(cfg.model.image_size)
    data = cfg.data
    plain = eval_transform(size, data.mean, data.std)
    crop = train_transform(size, tuple(data.crop_scale), False, data.mean, data.std)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(count):
        images, views, texts = [], [], []
        for i in range(batch):
            _, caps, img = make_example(seed, "bench", b * batch + i, image_size=size)
            images.append(plain(img))
            if data.views == 2:
                views.append(crop(img, gen))
            texts.append(pre_caption(caps[0], data.max_words))
        item: dict[str, Any] = {"image": torch.stack(images), "text": texts}
        if views:
            item["image2"] = torch.stack(views)
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------------ timing helpers


class SectionTimer:
    """Accumulates the time spent inside wrapped calls during one step (CUDA events on GPU, wall clock on CPU)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self._events: list[tuple[Any, Any]] = []
        self._seconds = 0.0

    @contextlib.contextmanager
    def section(self) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - t0

    def take(self) -> float:
        """Seconds accumulated since the last call (call after the step has been synchronised)."""
        total = self._seconds + sum(s.elapsed_time(e) for s, e in self._events) / 1e3
        self._events, self._seconds = [], 0.0
        return total


def wrap_method(obj: Any, name: str, timer: SectionTimer) -> None:
    """Replace ``obj.name`` on this instance by a timed call of the original (the class is not touched)."""
    original: Callable[..., Any] = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        with timer.section():
            return original(*args, **kwargs)

    setattr(obj, name, timed)


class PeakRss:
    """Peak resident set size of this process since :meth:`reset` (Linux ``VmHWM``, reset via ``clear_refs``)."""

    def __init__(self) -> None:
        self.base = 0
        self.resettable = False

    @staticmethod
    def _status(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS
            self.resettable = True
        except OSError:
            self.resettable = False  # then VmHWM still holds the build-time peak: growth is a lower bound
        self.base = self._status("VmRSS")

    def growth(self) -> int:
        return max(0, self._status("VmHWM") - self.base)


# ------------------------------------------------------------------------------------------------ one model


def measure(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build ``name`` from its tiny recipe and time its steps; returns the raw and summarised measurements."""
    from launch.config import load_config
    from pretrain.config import PretrainConfig
    from pretrain.engine import param_groups
    from pretrain.mixgen import apply_mixgen
    from pretrain.models import get

    recipe = ROOT / "configs" / "pretrain" / f"{name}_tiny.yaml"
    cfg = load_config(PretrainConfig, recipe, [], check_paths=False)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    mixcfg = dataclasses.replace(cfg.mixgen, enabled=True)
    tc = cfg.train

    torch.manual_seed(0)
    model = get(cfg.model.name)[1](cfg.model).to(device)
    model.train()
    opt = torch.optim.AdamW(
        param_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay
    )
    after = getattr(model, "after_optimizer_step", None)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = make_batches(cfg, args.batch, args.num_batches)

    ema_timer, queue_timer = SectionTimer(cuda), SectionTimer(cuda)
    has_momentum = bool(getattr(model, "has_momentum", False))
    if has_momentum:
        wrap_method(model, "momentum_update", ema_timer)
        wrap_method(model.queues, "get", queue_timer)
        wrap_method(model.queues, "enqueue", queue_timer)

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def to_device(batch: dict[str, Any]) -> dict[str, Any]:
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def step(i: int, mode: str) -> dict[str, float]:
        b = dict(batches[i % len(batches)])
        texts = b["text"]
        b["step"], b["steps_per_epoch"] = i, None  # no epoch length: ALBEF's alpha at its full value
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        if mode != "off":
            b = apply_mixgen(b, mixcfg, seed=0, step=i, rank=0)
            if mode == "img":
                b["text"] = texts  # control: mixed images, original captions (no longer text to pad to)
        t_mix = time.perf_counter() - t0  # CPU tensors and strings: no device work to wait for
        b = to_device(b)
        with autocast():
            loss = model(b)["loss"]
        loss.backward()
        if tc.grad_clip and tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if callable(after):
            after()
        sync()
        total = time.perf_counter() - t0
        out = {"step": total, "mixgen": t_mix, "ema": ema_timer.take(), "queue": queue_timer.take()}
        if cuda:
            out["peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
        return out

    rss = PeakRss()
    rss.reset()
    resting_mib = torch.cuda.memory_allocated(device) / MIB if cuda else rss.base / MIB
    modes = ["off", "on"] + (["img"] if args.control else [])
    for i in range(args.warmup):
        for mode in modes:
            step(i, mode)
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for rep in range(args.reps):
        shift = rep % len(modes)  # rotate the order every repetition: each mode runs first, second, ... in turn
        for mode in modes[shift:] + modes[:shift]:
            runs[mode].append(step(args.warmup + rep, mode))

    # the second part of MixGen's cost: concatenated captions pad the text batch to more tokens
    def padded_length(b: dict[str, Any]) -> int:
        tok = model.tokenize(b["text"])
        ids = tok["input_ids"] if isinstance(tok, dict) else tok.input_ids
        return int(ids.shape[1])

    tokens = {
        "off": statistics.mean(padded_length(b) for b in batches),
        "on": statistics.mean(
            padded_length(apply_mixgen(dict(b), mixcfg, seed=0, step=i, rank=0)) for i, b in enumerate(batches)
        ),
    }

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    off, on = med("off", "step"), med("on", "step")
    paired = [b["step"] - a["step"] for a, b in zip(runs["off"], runs["on"])]
    spread = statistics.median(abs(r["step"] - off) for r in runs["off"])
    mix_ms = med("on", "mixgen")
    momentum = [r["ema"] + r["queue"] for r in runs["off"] + runs["on"]]
    result: dict[str, Any] = {
        "model": name,
        "recipe": str(recipe.relative_to(ROOT)),
        "device": str(device),
        "bf16": bool(args.bf16),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "image_size": int(cfg.model.image_size),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "step_ms_off": 1e3 * off,
        "step_ms_on": 1e3 * on,
        "mad_ms_off": 1e3 * spread,
        "overhead_pct": 100.0 * (on - off) / off,
        "paired_overhead_pct": 100.0 * statistics.median(paired) / off,
        "mixgen_ms": 1e3 * mix_ms,
        "mixgen_min_ms": 1e3 * min(r["mixgen"] for r in runs["on"]),
        "mixgen_share_pct": 100.0 * mix_ms / off,
        "tokens_off": tokens["off"],
        "tokens_on": tokens["on"],
        "has_momentum": has_momentum,
        "ema_ms": 1e3 * statistics.median(r["ema"] for r in runs["off"] + runs["on"]) if has_momentum else None,
        "queue_ms": 1e3 * statistics.median(r["queue"] for r in runs["off"] + runs["on"]) if has_momentum else None,
        "momentum_queue_ms": 1e3 * statistics.median(momentum) if has_momentum else None,
        "momentum_queue_share_pct": 100.0 * statistics.median(momentum) / off if has_momentum else None,
        "resting_mib": resting_mib,
        "raw": runs,
    }
    if args.control:
        result["step_ms_img"] = 1e3 * med("img", "step")
        result["img_overhead_pct"] = 100.0 * (med("img", "step") - off) / off
        paired_img = [b["step"] - a["step"] for a, b in zip(runs["off"], runs["img"])]
        result["paired_img_overhead_pct"] = 100.0 * statistics.median(paired_img) / off
    if cuda:
        result["peak_mib_off"] = med("off", "peak_mib")
        result["peak_mib_on"] = med("on", "peak_mib")
    else:
        result["rss_growth_mib"] = rss.growth() / MIB
        result["rss_resettable"] = rss.resettable
    return result


# ------------------------------------------------------------------------------------------------ driver


def run_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``name`` in a fresh interpreter (clean allocator and peak-RSS state); returns its result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--device", args.device]
    cmd += ["--batch", str(args.batch), "--warmup", str(args.warmup), "--reps", str(args.reps)]
    cmd += ["--num-batches", str(args.num_batches)] + (["--bf16"] if args.bf16 else [])
    cmd += ["--control"] if args.control else []
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker for model '{name}' failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"worker for model '{name}' printed no result:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """The step/MixGen table, then the momentum and memory table."""
    r0 = results[0]
    print(
        f"\nPretraining step: device {r0['device']}{' bf16 autocast' if r0['bf16'] else ''}, batch {args.batch}, "
        f"torch threads {r0['threads']}, warmup {args.warmup} pairs, {args.reps} interleaved off/on reps (medians); "
        "MixGen default, ratio 0.25, lam 0.5. Anchor: step ms with MixGen off; target overhead <= 0.5 %."
    )
    head = (
        f"{'model':<7}{'px':>4}{'params M':>9}{'step ms off':>12}{'step ms on':>11}{'±MAD ms':>9}"
        f"{'(on-off)/off':>13}{'paired':>9}{'mixgen ms':>10}{'mixgen/step':>12}{'tokens off→on':>15}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['model']:<7}{r['image_size']:>4}{r['params_m']:>9.1f}{r['step_ms_off']:>12.1f}{r['step_ms_on']:>11.1f}"
            f"{r['mad_ms_off']:>9.1f}{r['overhead_pct']:>+12.2f}%{r['paired_overhead_pct']:>+8.2f}%"
            f"{r['mixgen_ms']:>10.3f}{r['mixgen_share_pct']:>11.3f}%"
            f"{r['tokens_off']:>8.1f}→{r['tokens_on']:<6.1f}"
        )
    if "step_ms_img" in r0:
        head_c = f"{'model':<7}{'step ms off':>12}{'images mixed only':>18}{'(img-off)/off':>14}{'paired':>9}"
        print("\nControl: MixGen's image mixing without its caption concatenation")
        print(head_c)
        print("-" * len(head_c))
        for r in results:
            print(
                f"{r['model']:<7}{r['step_ms_off']:>12.1f}{r['step_ms_img']:>18.1f}{r['img_overhead_pct']:>+13.2f}%"
                f"{r['paired_img_overhead_pct']:>+8.2f}%"
            )
    cuda = r0["device"].startswith("cuda")
    mem_head = "peak MiB off / on" if cuda else "peak RSS growth MiB"
    head2 = f"{'model':<7}{'EMA ms':>9}{'queue ms':>10}{'EMA+queue ms':>14}{'share of step':>15}{mem_head:>22}"
    print()
    print(head2)
    print("-" * len(head2))
    for r in results:
        if cuda:
            mem = f"{r['peak_mib_off']:.0f} / {r['peak_mib_on']:.0f}"
        else:
            mem = f"{r['rss_growth_mib']:.0f}" + ("" if r["rss_resettable"] else " (lower bound)")
        share = None if r["momentum_queue_share_pct"] is None else r["momentum_queue_share_pct"]
        print(
            f"{r['model']:<7}{_fmt(r['ema_ms'], '.2f'):>9}{_fmt(r['queue_ms'], '.3f'):>10}"
            f"{_fmt(r['momentum_queue_ms'], '.2f'):>14}{_fmt(share, '.2f') + (' %' if share is not None else ''):>15}"
            f"{mem:>22}"
        )
    print(
        "\n(on-off)/off: ratio of median step times; paired: median of per-rep (on - off) differences / median off; "
        "±MAD: median absolute deviation of the off steps (the noise floor of both overhead columns). "
        "mixgen/step: the apply_mixgen call alone / median step off. tokens: mean padded caption length."
    )
    if not cuda:
        print(
            "peak RSS growth: VmHWM after all steps minus VmRSS once model, optimizer and batches were built "
            "(activations, gradients, AdamW state, allocator caching; both modes together)."
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ", ".join(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3, help="pairs of (off, on) steps before timing")
    parser.add_argument("--reps", type=int, default=10, help="interleaved (off, on) repetitions timed")
    parser.add_argument("--num-batches", type=int, default=4, help="distinct pre-built batches, cycled")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--bf16", action="store_true", help="forward under torch.autocast(bfloat16)")
    parser.add_argument(
        "--control",
        action="store_true",
        help="a third interleaved mode: images mixed, captions left unmixed (separates the mixing from the "
        "longer captions)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all results (with raw step times)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to this torch build")
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    results = []
    for name in names:
        t0 = time.perf_counter()
        results.append(run_worker(name, args))
        print(f"measured {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    print_tables(results, args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
