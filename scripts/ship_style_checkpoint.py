"""Copy a trained style checkpoint into the repository in fp16, if fp16 changes nothing visible.

    python scripts/ship_style_checkpoint.py runs/style_lite0/style_checkpoint.safetensors \
        assets/style_lite0.safetensors --images runs/demo/data/test

The transformer's weights are stored in fp16 (the predictor head stays fp32, the embedding statistics fp64); the
stage loads them into fp32 modules. The script stylizes test images with both (same draws, α = 0.5 and 1) and keeps
fp16 only when the largest pixel difference is below half a grey level (0.5 / 255): then the 8-bit images the stage
writes are the same. A predictor trunk that was frozen and equals the packaged ImageNet EfficientNet-Lite0 is left
out of the file (metadata ``predictor_trunk``) and refilled from the package on load.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.style.network import (  # noqa: E402
    StyleTransformer,
    load_style_checkpoint,
    packaged_trunk_state,
    predictor_for,
    save_style_checkpoint,
)
from data_prep.style.sampling import EmbeddingSampler, StyleRandomizer  # noqa: E402


def randomizer(ck: dict) -> StyleRandomizer:
    t = StyleTransformer()
    t.load_state_dict(ck["transformer"])
    p = predictor_for(ck["meta"])
    p.load_state_dict(ck["predictor"])
    return StyleRandomizer(t.eval(), EmbeddingSampler(ck["mean"], ck["cov"]), p.eval())


def images(folder: Path, n: int) -> torch.Tensor:
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")
                    out.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
                if len(out) == n:
                    return torch.stack(out)
    return torch.stack(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--images", default="runs/demo/data/test")
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()
    ck = load_style_checkpoint(args.src)
    # a frozen (predictor_train: head) Lite0 trunk equal to the package's is left out of the file and refilled on load
    trunk = {k: v for k, v in (ck["predictor"] or {}).items() if k.startswith("backbone.")}
    packaged = ck["meta"].get("predictor") == "efficientnet_lite0" and ck["meta"].get("predictor_train") == "head"
    if packaged:
        reference = packaged_trunk_state()
        packaged = trunk.keys() == reference.keys() and all(torch.equal(v, reference[k]) for k, v in trunk.items())
    print(f"predictor trunk: {'the packaged ImageNet Lite0, left out of the file' if packaged else 'stored'}")
    half = {  # the transformer in fp16; the predictor (head) stays fp32
        "transformer": {k: (v.half() if v.is_floating_point() else v) for k, v in ck["transformer"].items()},
        "predictor": ck["predictor"],
    }
    meta = {**ck["meta"], "weights_dtype": "float16", "shipped_from": Path(args.src).name}
    t, p = StyleTransformer(), predictor_for(ck["meta"])
    t.load_state_dict(half["transformer"])
    p.load_state_dict(half["predictor"])
    x = images(Path(args.images), args.n)
    z = EmbeddingSampler(ck["mean"], ck["cov"]).sample(len(x), torch.Generator().manual_seed(0))
    full = randomizer(ck)
    cut = StyleRandomizer(t.eval(), EmbeddingSampler(ck["mean"], ck["cov"]), p.eval())
    diff = max(float((full(x, z_rand=z, alpha=a) - cut(x, z_rand=z, alpha=a)).abs().max()) for a in (0.5, 1.0))
    keep_half = diff < 0.5 / 255
    print(f"largest pixel difference fp32 vs fp16 weights: {diff * 255:.3f} grey levels -> "
          f"{'fp16' if keep_half else 'fp32 (fp16 would change the output)'}")  # fmt: skip
    if not keep_half:
        t.load_state_dict(ck["transformer"])
        p.load_state_dict(ck["predictor"])
        meta["weights_dtype"] = "float32"
    else:
        t = t.half()
    save_style_checkpoint(args.dst, t, p, ck["mean"], ck["cov"], ck["base"], meta=meta, packaged_trunk=packaged)
    print(f"wrote {args.dst} ({Path(args.dst).stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
