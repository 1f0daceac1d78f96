"""What the trained style network does, against the same network untrained (docs/style.md, "The shipped network").

    python bench/style_quality.py --checkpoint runs/style_lite0/style_checkpoint.safetensors --data runs/demo/data \
        --grid docs/style_grid.png

Prints four tables:

* losses: content and style losses (the training objective's EfficientNet-Lite0 terms and weights) of
  ``T(c, P(s))`` for synthetic test images ``c`` and *held-out* procedural styles ``s`` (another seed of the set);
* shape kept: SSIM of the luminance and agreement of Sobel edge maps (correlation) between input and output,
  at α = 0, 0.5, 1 with z drawn from the checkpoint's N(μ, Σ) as the stage does;
* semantics kept: a linear probe on frozen ImageNet EfficientNet-Lite0 features, trained to name the main
  object's shape (the set's ``label``) on the synthetic train split, scored on the original and the stylized
  test images;
* the anchor of each ratio is the untrained network (random transformer, ImageNet trunk + random head predictor).

and writes the grid PNG: one row per test image; the original, α = 0, then three random styles at α = 0.5 and 1.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep.efficientnet import IMAGENET_MEAN, IMAGENET_STD, efficientnet_lite0  # noqa: E402
from data_prep.style import procedural  # noqa: E402
from data_prep.style.network import StylePredictor, StyleTransformer, load_style_checkpoint, predictor_for  # noqa: E402
from data_prep.style.sampling import EmbeddingSampler, StyleRandomizer  # noqa: E402
from pretrain.models.style_transfer import (  # noqa: E402
    LITE0_CONTENT_LAYER,
    LITE0_STYLE_LAYERS,
    EfficientNetLoss,
    content_loss,
    gram_matrix,
    style_loss,
)


def read_split(data: Path, split: str, limit: int, size: int) -> tuple[torch.Tensor, list[str]]:
    """Images ([N,3,size,size] in [0,1]) and their class labels (the main object's shape)."""
    labels = {}
    for line in (data / f"{split}_scenes.jsonl").read_text().splitlines():
        rec = json.loads(line)
        labels[rec["key"]] = rec["label"]  # the set's classification label (the main object's shape)
    images, names = [], []
    for tar in sorted((data / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key = m.name.rsplit(".", 1)[0]
                if m.name.endswith(".jpg") and key in labels:
                    img = Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB").resize((size, size))
                    images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
                    names.append(labels[key])
                if len(images) >= limit:
                    return torch.stack(images), names
    return torch.stack(images), names


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of the luminance (Gaussian window 11, σ 1.5), per image."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x, y = (a * w).sum(1, keepdim=True), (b * w).sum(1, keepdim=True)
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    k = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 11, 11)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, k)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean((1, 2, 3))


def edges(x: torch.Tensor) -> torch.Tensor:
    lum = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    gx, gy = F.conv2d(lum, kx), F.conv2d(lum, kx.transpose(2, 3))
    return (gx**2 + gy**2).sqrt().flatten(1)


def edge_agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the Sobel edge magnitudes of input and output, per image."""
    ea, eb = edges(a), edges(b)
    ea, eb = ea - ea.mean(1, keepdim=True), eb - eb.mean(1, keepdim=True)
    return (ea * eb).sum(1) / (ea.norm(dim=1) * eb.norm(dim=1) + 1e-8)


@torch.no_grad()
def features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return torch.cat([net((x[i : i + 64] - mean) / std) for i in range(0, len(x), 64)])


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, classes: int) -> torch.nn.Linear:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    head = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=200, line_search_fn="strong_wolfe")
    z = (train_x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(z), train_y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    probe = torch.nn.Linear(train_x.shape[1], classes)
    with torch.no_grad():  # fold the standardisation into the layer
        probe.weight.copy_(head.weight / sd)
        probe.bias.copy_(head.bias - (head.weight * mu / sd).sum(1))
    return probe


def randomizer_from(ck: dict, transformer: StyleTransformer, predictor: StylePredictor) -> StyleRandomizer:
    return StyleRandomizer(transformer.eval(), EmbeddingSampler(ck["mean"], ck["cov"]), predictor.eval())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="runs/style_lite0/style_checkpoint.safetensors")
    ap.add_argument("--data", default="runs/demo/data")
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--train", type=int, default=800)
    ap.add_argument("--grid", default="docs/style_grid.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    data = Path(args.data)

    ck = load_style_checkpoint(args.checkpoint)
    trained_t = StyleTransformer()
    trained_t.load_state_dict(ck["transformer"])
    trained_p = predictor_for(ck["meta"])
    trained_p.load_state_dict(ck["predictor"])
    torch.manual_seed(args.seed)
    untrained_t = StyleTransformer()  # a random transformer and an ImageNet-trunk predictor with a random head
    untrained_p = StylePredictor(backbone="efficientnet_lite0", init="efficientnet_lite0_imagenet")
    nets = {"untrained": (untrained_t.eval(), untrained_p.eval()), "trained": (trained_t.eval(), trained_p.eval())}

    test_x, test_names = read_split(data, "test", args.test, args.size)
    # held-out styles: another seed of the procedural set than the one the network trained on
    held = torch.stack(
        [torch.from_numpy(np.asarray(procedural.render(1, i, args.size)[0]).copy()).permute(2, 0, 1).float() / 255
         for i in range(len(test_x))]
    )  # fmt: skip

    # ---- losses
    loss_net = EfficientNetLoss()
    weights = [float(w) for w in ck["meta"].get("style_weights", "0.02,0.02,0.04,0.04").split(",")]
    content_w = float(ck["meta"].get("content_weight", "1.0"))
    rows = {}
    with torch.no_grad():
        fc, fs = loss_net(test_x), loss_net(held)
        for name, (t, p) in nets.items():
            out = torch.cat([t(test_x[i : i + 16], p(held[i : i + 16])) for i in range(0, len(test_x), 16)])
            fo = loss_net(out)
            lc = content_w * content_loss(fo[LITE0_CONTENT_LAYER], fc[LITE0_CONTENT_LAYER]).item()
            ls = sum(
                w * style_loss(gram_matrix(fo[k]), gram_matrix(fs[k])).item()
                for w, k in zip(weights, LITE0_STYLE_LAYERS)
            )
            rows[name] = (lc, ls)
        # reference points: the content image itself as output (no style), the style image itself (no content)
        ident_ls = sum(
            w * style_loss(gram_matrix(fc[k]), gram_matrix(fs[k])).item() for w, k in zip(weights, LITE0_STYLE_LAYERS)
        )
        style_lc = content_w * content_loss(fs[LITE0_CONTENT_LAYER], fc[LITE0_CONTENT_LAYER]).item()
    print(f"\nLosses on {len(test_x)} synthetic test images x held-out procedural styles ({args.size} px), "
          "EfficientNet-Lite0 loss network, training weights")  # fmt: skip
    print("| network | content | style | total |\n|---|---|---|---|")
    for name, (lc, ls) in rows.items():
        print(f"| {name} | {lc:.2f} | {ls:.2f} | {lc + ls:.2f} |")
    print(f"| (output = content image) | 0.00 | {ident_ls:.2f} | {ident_ls:.2f} |")
    print(f"| (output = style image) | {style_lc:.2f} | 0.00 | {style_lc:.2f} |")
    ratio = (rows["trained"][0] + rows["trained"][1]) / (rows["untrained"][0] + rows["untrained"][1])
    print(f"total loss ratio trained / untrained: {ratio:.3f}")

    # ---- shape and semantics
    probe_net = efficientnet_lite0(num_classes=0).eval()
    train_x, train_names = read_split(data, "train", args.train, args.size)
    classes = sorted(set(train_names) | set(test_names))
    train_y = torch.tensor([classes.index(n) for n in train_names])
    test_y = torch.tensor([classes.index(n) for n in test_names])
    probe = linear_probe(features(probe_net, train_x), train_y, len(classes))

    def accuracy(x: torch.Tensor) -> float:
        with torch.no_grad():
            return float((probe(features(probe_net, x)).argmax(1) == test_y).float().mean()) * 100

    print(f"\nShape and semantics on {len(test_x)} test images; z ~ N(mu, Sigma) of the checkpoint as in the stage; "
          f"probe: {len(classes)} shapes, chance {100 / len(classes):.1f}%")  # fmt: skip
    print("| network | alpha | SSIM (luminance) | edge agreement | probe accuracy % |\n|---|---|---|---|---|")
    print(f"| (original) | - | 1.000 | 1.000 | {accuracy(test_x):.1f} |")
    g_draw = torch.Generator().manual_seed(args.seed)
    z = EmbeddingSampler(ck["mean"], ck["cov"]).sample(len(test_x), g_draw)
    for name, (t, p) in nets.items():
        rnd = randomizer_from(ck, t, p)
        for alpha in (0.0, 0.5, 1.0):
            out = torch.cat(
                [rnd(test_x[i : i + 16], z_rand=z[i : i + 16], alpha=alpha) for i in range(0, len(test_x), 16)]
            )
            print(f"| {name} | {alpha} | {ssim(test_x, out).mean():.3f} | {edge_agreement(test_x, out).mean():.3f} | "
                  f"{accuracy(out):.1f} |")  # fmt: skip

    # ---- grid
    rnd = randomizer_from(ck, trained_t, trained_p)
    inputs = test_x[:4]
    zs = EmbeddingSampler(ck["mean"], ck["cov"]).sample(3, torch.Generator().manual_seed(args.seed + 1))
    cols = [inputs, rnd(inputs, z_rand=zs[:1].expand(4, -1), alpha=0.0)]
    for j in range(3):
        for alpha in (0.5, 1.0):
            cols.append(rnd(inputs, z_rand=zs[j : j + 1].expand(4, -1), alpha=alpha))
    import torchvision.utils as vutils

    grid = torch.stack(cols, 1).flatten(0, 1)
    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    vutils.save_image(grid, args.grid, nrow=len(cols), padding=2, pad_value=1.0)
    print(f"\ngrid: {args.grid} (rows: test images; columns: original, alpha 0, then styles 1-3 at alpha 0.5 and 1)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
