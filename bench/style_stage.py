"""Throughput of the style stage's batched network path against two anchors.

CPU (default):
  python bench/style_stage.py [--threads 1]
  rows at 96², 256² and 512²: our batched path (StyleRandomizer: predictor + transformer, fp32, channels_last,
  fused instance norm, sub-pixel upsampling) vs (1) a per-image eager fp32 re-implementation of the public
  StyleAugmentor forward in the same run (predictor with the public preprocessing, IN then gamma*x+beta as separate
  ops, nearest upsample, autograd on and BatchNorm in train mode as shipped; also under inference_mode/eval) and
  (2) the arithmetic floor: nominal FLOPs per image / machine FLOP/s (matmul probe; a 3x3-conv probe is shown too).
  Plus one end-to-end row from shards (decode, stylize, encode, write) at 96².

GPU:
  python bench/style_stage.py --gpu            (runs when CUDA is available)
  network-only img/s at 256² in bf16 for batch 64/128/256 and end to end from shards at 256² (DataLoader workers
  decoding, thread-pool encoding), each against the floor at the measured bf16 matmul rate.
  ``--gpu --device cpu --tiny`` runs the same code path on CPU with tiny sizes (a smoke test of the script).

Prints tables and ratios; never passes or fails on time.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.style.network import StylePredictor, StyleTransformer  # noqa: E402
from data_prep.style.sampling import EmbeddingSampler, StyleRandomizer  # noqa: E402


# ------------------------------------------------------------------------------------------------ FLOPs
def transformer_flops(h: int, w: int) -> float:
    """Nominal FLOPs (2 x MAC, convs only) of the published network at HxW (a multiple of 4)."""
    macs = 0
    layers = [(3, 32, 9, 1), (32, 64, 3, 2), (64, 128, 3, 2)]
    hh, ww = h, w
    for ci, co, k, s in layers:
        hh, ww = hh // s, ww // s
        macs += ci * co * k * k * hh * ww
    macs += 10 * 128 * 128 * 9 * hh * ww
    for ci, co in ((128, 64), (64, 32)):
        hh, ww = hh * 2, ww * 2
        macs += ci * co * 9 * hh * ww
    macs += 32 * 3 * 81 * hh * ww
    return 2.0 * macs


def predictor_flops(predictor: nn.Module, h: int, w: int) -> float:
    """FLOPs of the predictor's convs and fc at HxW, counted with forward hooks."""
    total = [0.0]

    def hook(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += 2.0 * out.numel() * k
        elif isinstance(mod, nn.Linear):
            total[0] += 2.0 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in predictor.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        predictor.eval()(torch.rand(1, 3, h, w))
    for hd in handles:
        hd.remove()
    return total[0]


# ------------------------------------------------------------------------------------------------ probes
def _best(fn: Callable[[], object], reps: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _interleaved_best(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best time of each function over ``rounds`` rounds that alternate between them (fair under shared CPUs)."""
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def matmul_probe(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(4 if device.type == "cpu" else 50):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    reps = 4 if device.type == "cpu" else 50
    return 2.0 * n**3 * reps / _best(run)


def conv_probe() -> float:
    x = torch.randn(4, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        t = _best(lambda: F.conv2d(x, w, padding=1))
    return 2.0 * 4 * 128 * 128 * 9 * 64 * 64 / t


# ------------------------------------------------------------------------------------------------ the reference
def reference_augment(
    transformer_sd: dict[str, torch.Tensor], predictor: nn.Module, x: torch.Tensor, z_rand: torch.Tensor
) -> torch.Tensor:
    """One image through the public StyleAugmentor forward, op for op (own code, written from the notes)."""
    sd = transformer_sd
    # predictor preprocessing as published: clone, per-channel in-place ImageNet then Inception conversion
    p = x.clone()
    for c, (m, s, s2) in enumerate(zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.255), (0.229, 0.224, 0.225))):
        p[:, c] = (p[:, c] - m) / s
        p[:, c] = p[:, c] * (s2 / 0.5) + (m - 0.5) / 0.5
    feats = predictor.backbone(p)
    base = predictor.fc(feats.mean(dim=3).mean(dim=2))
    z = 0.5 * z_rand + 0.5 * base

    def conv(t: torch.Tensor, name: str, stride: int = 1) -> torch.Tensor:
        k = sd[name + ".weight"].shape[-1]
        return F.conv2d(nn.ReflectionPad2d(k // 2)(t), sd[name + ".weight"], sd[name + ".bias"], stride=stride)

    def cin(t: torch.Tensor, name: str) -> torch.Tensor:
        beta = F.linear(z, sd[name + ".beta.weight"], sd[name + ".beta.bias"]).unsqueeze(2).unsqueeze(3)
        gamma = F.linear(z, sd[name + ".gamma.weight"], sd[name + ".gamma.bias"]).unsqueeze(2).unsqueeze(3)
        t = F.instance_norm(t)
        t = gamma * t
        t += beta
        return t

    h = x
    for i, s in enumerate((1, 2, 2)):
        h = F.relu(F.instance_norm(conv(h, f"down.{i}.conv", s)))
    for j in range(5):
        y = F.relu(cin(conv(h, f"res.{j}.conv1.conv"), f"res.{j}.norm1"))
        y = cin(conv(y, f"res.{j}.conv2.conv"), f"res.{j}.norm2")
        h = h + y
    for j in range(2):
        h = F.relu(cin(conv(nn.Upsample(scale_factor=2)(h), f"up.{j}.conv.conv"), f"up.{j}.norm"))
    h = cin(conv(h, "out_conv.conv"), "out_norm")
    return torch.sigmoid(h).detach()


# ------------------------------------------------------------------------------------------------ CPU
def stats() -> EmbeddingSampler:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, 100, generator=g, dtype=torch.float64) * 0.1
    return EmbeddingSampler(torch.randn(100, generator=g, dtype=torch.float64), a @ a.T)


def cpu_bench(sizes: list[tuple[int, int, int]], with_reference: bool) -> None:
    torch.manual_seed(0)
    transformer, predictor = StyleTransformer().eval(), StylePredictor().eval()
    sampler = stats()
    ours = StyleRandomizer(copy.deepcopy(transformer), sampler, copy.deepcopy(predictor))
    ours_bf16 = StyleRandomizer(copy.deepcopy(transformer), sampler, copy.deepcopy(predictor), precision="bf16")
    ref_sd = {k: v.clone().requires_grad_(True) for k, v in transformer.state_dict().items()}  # as shipped: grads on
    ref_pred_train = copy.deepcopy(predictor).train()  # as shipped: BatchNorm in train mode
    pa, pb = torch.randn(1024, 1024), torch.randn(1024, 1024)
    px = torch.randn(4, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    pw = torch.randn(128, 128, 3, 3).contiguous(memory_format=torch.channels_last)
    conv_flops = 2.0 * 4 * 128 * 128 * 9 * 64 * 64
    print(f"threads={torch.get_num_threads()}; every timing is the best of rounds that alternate all paths + probes")
    print("floor = nominal GFLOP/img / max(1024² fp32 matmul probe, 3x3-conv probe) measured in the same rounds")
    print("ref = per-image eager fp32 public forward (predictor included): as shipped (autograd on, BN train mode),")
    print("      and under inference_mode/eval")
    print("ours = stage path, fp32 (the CPU default); bf16 = runtime.precision=bf16 (opt-in, autocast on CPU)")
    head = (
        f"{'size':>5} {'batch':>5} {'GFLOP/img':>9} {'ours img/s':>10} {'ref as-shipped':>14} {'ref no-grad':>11} "
        f"{'x as-shipped':>12} {'x no-grad':>9} {'floor img/s':>11} {'of floor':>8} {'bf16 img/s':>10} "
        f"{'bf16 x no-grad':>14} {'bf16 mean|d|':>12} {'probe GF/s':>10}"
    )
    print(head)
    print("-" * len(head))
    for size, batch, reps in sizes:
        x = torch.rand(batch, 3, size, size)
        z = sampler.sample(batch, torch.Generator().manual_seed(1))
        gflop = (transformer_flops(size, size) + predictor_flops(predictor, size, size)) / 1e9
        err = (ours(x[:2], z_rand=z[:2]) - ours_bf16(x[:2], z_rand=z[:2])).abs().mean().item()

        def ref_shipped(x: torch.Tensor = x, z: torch.Tensor = z) -> None:
            for i in range(x.shape[0]):
                reference_augment(ref_sd, ref_pred_train, x[i : i + 1], z[i : i + 1])

        def ref_nograd(x: torch.Tensor = x, z: torch.Tensor = z) -> None:
            with torch.inference_mode():
                for i in range(x.shape[0]):
                    reference_augment(transformer.state_dict(), predictor, x[i : i + 1], z[i : i + 1])

        fns = {"ours": lambda x=x, z=z: ours(x, z_rand=z), "bf16": lambda x=x, z=z: ours_bf16(x, z_rand=z)}
        fns.update(mm=lambda: pa @ pb, conv=lambda: F.conv2d(px, pw, padding=1))  # probes, in the same rounds
        if with_reference:
            fns.update(ship=ref_shipped, nograd=ref_nograd)
        best = _interleaved_best(fns, reps)
        t_ours, t_bf16 = best["ours"], best["bf16"]
        mm, cv = 2.0 * 1024**3 / best["mm"], conv_flops / best["conv"]
        peak = max(mm, cv)
        r_ship = batch / best.get("ship", float("nan"))
        r_ng = batch / best.get("nograd", float("nan"))
        o = batch / t_ours
        floor = peak / (gflop * 1e9)
        print(
            f"{size:>5} {batch:>5} {gflop:>9.2f} {o:>10.2f} {r_ship:>14.2f} {r_ng:>11.2f} {o / r_ship:>11.2f}x "
            f"{o / r_ng:>8.2f}x {floor:>11.2f} {o / floor:>7.0%} {batch / t_bf16:>10.2f} "
            f"{batch / t_bf16 / r_ng:>13.2f}x {err:>12.4f} {peak / 1e9:>10.0f}"
        )


# ------------------------------------------------------------------------------------------------ end to end
def make_input_shards(root: str, n_shards: int, per_shard: int, size: int) -> str:
    from PIL import Image

    from data_prep.shards import ShardWriter

    rng = np.random.default_rng(0)
    for sh in range(n_shards):
        with ShardWriter(root, sh) as w:
            for i in range(per_shard):
                # smooth random images (JPEG-friendly, like photos) rather than white noise
                small = (rng.random((size // 8, size // 8, 3)) * 255).astype(np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                key = f"{sh:05d}{i:04d}"
                w.write(key, buf.getvalue(), f"image {key}", {"captions": [f"image {key}"], "source": "bench"})
            w.finish({})
    return os.path.join(root, f"{{00000..{n_shards - 1:05d}}}.tar")


def end_to_end(size: int, n_shards: int, per_shard: int, extra: list[str], gflop: float, peak: float) -> None:
    from data_prep.style.stage import StageConfig, run
    from launch.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        pattern = make_input_shards(os.path.join(tmp, "in"), n_shards, per_shard, size)
        emb = os.path.join(tmp, "emb.pth")
        s = stats()
        torch.save(
            {"pbn_embedding_mean": s.mean, "pbn_embedding_covariance": s.cov, "imagenet_embedding_mean": s.mean}, emb
        )
        overrides = [
            f"data.shards={pattern}",
            f"out.dir={os.path.join(tmp, 'out')}",
            f"model.embeddings={emb}",
            "model.random_init=true",
            "out.tensorboard=false",
            "out.grid_images=0",
            *extra,
        ]
        cfg = load_config(StageConfig, None, overrides)
        summary = run(cfg)
    n, dt = summary.get("stylized", 0), summary["seconds"]  # the shard loop, without building the model
    rate = n / dt
    floor = peak / (gflop * 1e9)
    print(
        f"end to end {size}² from shards: {n} stylized in {dt:.1f} s = {rate:.1f} img/s "
        f"(floor {floor:.0f} img/s, {rate / floor:.1%}); {' '.join(extra)}"
    )


# ------------------------------------------------------------------------------------------------ GPU
def gpu_bench(device: torch.device, tiny: bool) -> None:
    size = 64 if tiny else 256
    batches = [4, 8] if tiny else [64, 128, 256]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(torch.cuda.get_device_name(device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_probe(device, dtype, 1024 if tiny else 8192)
    print(f"{dtype} matmul probe: {peak / 1e12:.1f} TFLOP/s")
    transformer, predictor = StyleTransformer(), StylePredictor()
    gflop_t = transformer_flops(size, size) / 1e9
    gflop_p = predictor_flops(predictor, size, size) / 1e9
    rnd = StyleRandomizer(transformer, stats(), predictor, precision="auto").to(device)
    rnd_np = StyleRandomizer(copy.deepcopy(transformer), stats(), None, precision="auto").to(device)
    print(f"{'batch':>5} {'predictor':>9} {'img/s':>9} {'floor img/s':>11} {'of floor':>8}")
    for b in batches:
        x = torch.rand(b, 3, size, size, device=device)
        z = torch.randn(b, 100)
        for name, r, gf in (("yes", rnd, gflop_t + gflop_p), ("no", rnd_np, gflop_t)):

            def step(r: StyleRandomizer = r, x: torch.Tensor = x, z: torch.Tensor = z) -> None:
                for _ in range(2 if tiny else 10):
                    r(x, z_rand=z)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            t = _best(step, 2 if tiny else 3) / (2 if tiny else 10)
            rate = b / t
            floor = peak / (gf * 1e9)
            print(f"{b:>5} {name:>9} {rate:>9.0f} {floor:>11.0f} {rate / floor:>7.1%}")
    workers = 2 if tiny else 12
    extra = [f"runtime.device={device.type}", f"data.batch_size={batches[-1]}"]
    extra += [f"data.num_workers={workers}", f"runtime.encode_threads={workers}"]
    end_to_end(size, 2 if tiny else 8, 8 if tiny else 1024, extra, gflop_t + gflop_p, peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPU mode (needs CUDA unless --device cpu)")
    ap.add_argument("--device", default="cuda", help="device for --gpu mode")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--no-reference", action="store_true", help="skip the per-image reference rows")
    args = ap.parse_args()
    torch.set_num_threads(max(1, args.threads))
    if args.gpu:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            print("--gpu: CUDA is not available on this machine; nothing to measure")
            return
        gpu_bench(torch.device(args.device), args.tiny)
        return
    sizes = [(64, 4, 1)] if args.tiny else [(96, 16, 4), (256, 16, 3), (512, 4, 2)]
    cpu_bench(sizes, not args.no_reference)
    torch.manual_seed(0)
    gflop = (transformer_flops(96, 96) + predictor_flops(StylePredictor(), 96, 96)) / 1e9
    end_to_end(
        96,
        2,
        16,
        ["data.batch_size=16", "data.num_workers=1", "runtime.encode_threads=1"],
        gflop,
        max(matmul_probe(torch.device("cpu"), torch.float32), conv_probe()),
    )


if __name__ == "__main__":
    main()
