"""MixGen's cost inside a training step: the clip_tiny model and batch, MixGen off vs on, interleaved repetitions.

    python bench/mixgen_overhead.py [--reps 20] [--batch 16]

A step is apply_mixgen (or not) + forward + backward + AdamW step, on the same pre-built batches, alternating
the order of the two modes every repetition so that drifts in machine load hit both equally. MixGen's cost has
two parts: the mixing itself (a few tensor ops and string joins) and the longer captions it makes (M of B captions
become two captions long, so a batch padded to its longest caption has more tokens). Both paddings are measured:
``longest`` and ``max_length`` (a fixed context, as open_clip's 77 tokens, where MixGen adds no text compute).
The anchor is the step time without MixGen at the same padding; the target is an overhead <= 0.5 %. Prints a
table; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launch.config import load_config  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.mixgen import apply_mixgen  # noqa: E402
from pretrain.models import get  # noqa: E402

WORDS = "a the red blue green small large circle square triangle on left of right above below near striped".split()


def make_batches(n: int, batch: int, size: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        texts = []
        for _ in range(batch):
            k = int(torch.randint(5, 12, (1,), generator=g))
            texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
        out.append({"image": torch.randn(batch, 3, size, size, generator=g), "text": texts})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain/clip_tiny.yaml")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="default: data.batch_size of the recipe")
    args = parser.parse_args()

    cfg = load_config(PretrainConfig, args.config, [], check_paths=False)
    batch = args.batch or cfg.data.batch_size
    torch.manual_seed(0)
    model = get(cfg.model.name)[1](cfg.model)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batches = make_batches(4, batch, cfg.model.image_size)
    # (padding, mixgen): padding "longest" lets MixGen's longer captions add tokens; "max_length" (open_clip's
    # fixed context) keeps the text cost constant, leaving only the mixing itself
    modes = [(pad, mix) for pad in ("longest", "max_length") for mix in (False, True)]

    def step(i: int, pad: str, mix: bool) -> tuple[float, float]:
        model.opts.text_padding = pad
        b = dict(batches[i % len(batches)])
        t0 = time.perf_counter()
        if mix:
            b = apply_mixgen(b, cfg.mixgen, seed=0, step=i, rank=0)
        t_mix = time.perf_counter() - t0
        loss = model(b)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0, t_mix

    def padded_length(pad: str, mix: bool) -> float:
        model.opts.text_padding = pad
        texts = [
            (apply_mixgen(dict(b), cfg.mixgen, seed=0, step=i, rank=0) if mix else b)["text"]
            for i, b in enumerate(batches)
        ]
        return statistics.mean(model.tokenize(t)["input_ids"].shape[1] for t in texts)

    lengths = {m: padded_length(*m) for m in modes}
    for i in range(args.warmup):
        for m in modes:
            step(i, *m)
    times: dict[tuple[str, bool], list[float]] = {m: [] for m in modes}
    mix_times: list[float] = []
    for rep in range(args.reps):
        for m in modes if rep % 2 == 0 else modes[::-1]:  # alternate the order: drifts hit every mode alike
            total, t_mix = step(rep, *m)
            times[m].append(total)
            if m[1]:
                mix_times.append(t_mix)

    med = {m: statistics.median(v) for m, v in times.items()}
    mix_alone = statistics.median(mix_times)
    print(f"MixGen overhead: {cfg.model.name} from {args.config}, batch {batch}, {cfg.model.image_size}px, "
          f"variant {cfg.mixgen.variant}, ratio {cfg.mixgen.ratio}, {args.reps} interleaved reps, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'text padding':<14}{'MixGen':<8}{'tokens':>8}{'median ms':>12}{'mean ms':>10}{'min ms':>10}{'ratio':>9}")
    for pad, mix in modes:
        v = times[(pad, mix)]
        ratio = med[(pad, mix)] / med[(pad, False)]
        print(
            f"{pad:<14}{'on' if mix else 'off':<8}{lengths[(pad, mix)]:>8.1f}{1e3 * med[(pad, mix)]:>12.2f}"
            f"{1e3 * statistics.mean(v):>10.2f}{1e3 * min(v):>10.2f}{ratio:>9.4f}"
        )
    print(f"{'apply_mixgen alone':<30}{1e3 * mix_alone:>12.3f} ms = "
          f"{100 * mix_alone / med[('max_length', False)]:.3f} % of a fixed-length step (target <= 0.5 %)")  # fmt: skip
    for pad in ("longest", "max_length"):
        print(f"overhead with {pad} padding (median step ratio - 1): "
              f"{100 * (med[(pad, True)] / med[(pad, False)] - 1):+.2f} %")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
