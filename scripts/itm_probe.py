"""Can a fusion model's ITM learn on this data? Three probes of one pretraining recipe, ITM loss only.

    python scripts/itm_probe.py configs/pretrain/albef_tiny_pretrained.yaml --mode stream --steps 800 --lr 3e-4
    python scripts/itm_probe.py configs/pretrain/albef_tiny_pretrained.yaml --mode fixed --steps 150 --every 10
    python scripts/itm_probe.py configs/pretrain/albef_tiny_pretrained.yaml --mode frozen --steps 3000 --every 500

* ``stream``: a new batch every step, B positives + 2B uniformly drawn negatives (ALBEF's 1 : 2), AdamW on every
  trainable weight (``--new-lr-mult`` scales the lr of the randomly initialised cross-attention and ITM head).
* ``fixed``: the same batch every step: a model whose ITM gradient reaches the cross-attention memorises it.
* ``frozen``: an MLP over [mean image token, text summary] of the frozen towers, 1 : 1 negatives, scored on pairs
  it never saw: what the unimodal features alone allow.

Prints the loss and accuracy every ``--every`` steps; the constant prediction's loss is ``H(1/3) = 0.636`` for
ALBEF's 1 : 2 (``ln 2 = 0.693`` for ``frozen``'s 1 : 1). docs/finetune.md quotes the numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import models  # noqa: E402
from pretrain.config import load_pretrain_config  # noqa: E402
from pretrain.data import ShardLoader  # noqa: E402
from pretrain.objectives import hard_negative_itm  # noqa: E402

NEW = ("crossattention", "itm_head")  # parameters no pretrained tower provides


def build(recipe: str, batch_size: int, overrides: list[str]) -> tuple[nn.Module, Any]:
    cfg = load_pretrain_config(recipe, ["data.num_workers=0", f"data.batch_size={batch_size}", *overrides])
    torch.manual_seed(cfg.run.seed)
    _, make = models.get(cfg.model.name)
    model = make(cfg.model)
    if not hasattr(model, "itm_score"):
        raise SystemExit(f"{recipe}: model {cfg.model.name!r} has no ALBEF-style ITM (itm_score)")
    return model, iter(ShardLoader(cfg.data, seed=cfg.run.seed, rank=0, world_size=1, train=True))


def itm_step(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, float]:
    tokens = model.tokenize(batch["text"])
    image_embeds, _ = model.encode_image(batch["image"])
    text_embeds, _ = model.encode_text(tokens)
    flat = torch.zeros(len(batch["text"]), len(batch["text"]))  # equal similarities: uniform negatives
    out = hard_negative_itm(model.itm_score, image_embeds, text_embeds, tokens.attention_mask, flat, flat)
    return out.loss, (out.logits.argmax(1) == out.labels).float().mean().item()


def train_itm(model: nn.Module, batches: Any, args: argparse.Namespace) -> None:
    new = [p for n, p in model.named_parameters() if p.requires_grad and any(k in n for k in NEW)]
    old = [p for n, p in model.named_parameters() if p.requires_grad and not any(k in n for k in NEW)]
    opt = torch.optim.AdamW([{"params": old, "lr": args.lr}, {"params": new, "lr": args.lr * args.new_lr_mult}])
    model.train()
    batch = next(batches)
    start = time.time()
    print("step  itm_loss  itm_acc  seconds")
    for step in range(args.steps + 1):
        if args.mode == "stream" and step:
            batch = next(batches)
        loss, acc = itm_step(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            print(f"{step:4d}  {loss.item():8.4f}  {acc:7.3f}  {time.time() - start:7.1f}", flush=True)


def frozen_probe(model: nn.Module, batches: Any, args: argparse.Namespace) -> None:
    model.eval()
    images, texts = [], []
    with torch.no_grad():
        for _ in range(args.frozen_batches):
            batch = next(batches)
            image_embeds, _ = model.encode_image(batch["image"])
            text_embeds, _ = model.encode_text(model.tokenize(batch["text"]))
            images.append(image_embeds.mean(1))
            texts.append(text_embeds[:, 0])  # the summary the fusion layers' position 0 starts from
    img, txt = torch.cat(images), torch.cat(texts)
    n_train = len(img) * 3 // 4
    gen = torch.Generator().manual_seed(0)

    def pairs(lo: int, hi: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(lo, hi, (n,), generator=gen)
        neg = torch.randint(lo, hi, (n,), generator=gen)
        x = torch.cat([torch.cat([img[idx], txt[idx]], 1), torch.cat([img[neg], txt[idx]], 1)])
        return x, torch.cat([torch.ones(n), torch.zeros(n)]).long()

    mlp = nn.Sequential(nn.Linear(img.shape[1] + txt.shape[1], 512), nn.GELU(), nn.Linear(512, 2))
    opt = torch.optim.AdamW(mlp.parameters(), 1e-3)
    print(f"{n_train} train / {len(img) - n_train} held-out pairs")
    print("step  train_loss  heldout_acc")
    for step in range(args.steps + 1):
        x, y = pairs(0, n_train, 64)
        loss = F.cross_entropy(mlp(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % args.every == 0:
            with torch.no_grad():
                xv, yv = pairs(n_train, len(img), 512)
                acc = (mlp(xv).argmax(1) == yv).float().mean().item()
            print(f"{step:4d}  {loss.item():10.4f}  {acc:11.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", help="a pretraining recipe of an ALBEF-style model (albef, tcl)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    ap.add_argument("--mode", choices=("stream", "fixed", "frozen"), default="stream")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--new-lr-mult", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--frozen-batches", type=int, default=40, help="frozen mode: batches of 64 to embed")
    args = ap.parse_args(argv)
    if args.mode == "frozen":
        args.batch_size = 64
    model, batches = build(args.recipe, args.batch_size, args.overrides)
    if args.mode == "frozen":
        frozen_probe(model, batches, args)
    else:
        train_itm(model, batches, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
