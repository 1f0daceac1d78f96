"""What the image-text pair tasks (VQA, SNLI-VE) share: joint features per model, MLP heads, the training loader
over items, and distributed prediction that returns every item exactly once.

Joint features of an (image, text) pair, by model kind (:func:`pair_features`):

* ``fusion`` (ALBEF, TCL): the fused [CLS] state of the multimodal encoder (no pooler, as ALBEF's heads);
* ``single`` (ViLT): the pooled joint [CLS] (``cls_feats``: dense + tanh on the first token);
* ``dual`` (CLIP): a late-fusion vector ``[v; t; v*t; |v - t|]`` of the normalised image and text embeddings. CLIP
  has no fusion encoder, so its heads are a baseline, not a reproduction of anything published.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from finetune.data import CaptionLoader, Entry, ImageStore, eval_image_batches
from pretrain.models.momentum import autocast_like

log = logging.getLogger("vlp.finetune.pairs")


def spaced(items: Sequence[Any], limit: int) -> list[Any]:
    """``limit`` evenly spaced items (all when ``limit`` is 0 or not smaller), order kept."""
    if limit <= 0 or limit >= len(items):
        return list(items)
    return [items[(i * len(items)) // limit] for i in range(limit)]


def model_kind(model: nn.Module) -> str:
    """``dual`` (CLIP), ``fusion`` (ALBEF/TCL) or ``single`` (ViLT)."""
    if not hasattr(model, "fuse"):
        return "dual"
    return "fusion" if hasattr(model, "itm_logits") else "single"


def feature_dim(backbone: nn.Module) -> int:
    """Width of :func:`pair_features` for ``backbone``."""
    kind = model_kind(backbone)
    if kind == "fusion":
        return int(backbone.text_encoder.config.hidden_size)
    if kind == "single":
        return int(backbone.hidden_size)
    return 4 * int(backbone.opts.embed_dim)


def fused_states(backbone: nn.Module, images: torch.Tensor, texts: Sequence[str], *,
                 momentum: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """ALBEF/TCL: multimodal hidden states ``[B, L, H]`` of the texts over their images, and the text mask.

    ``momentum=True`` runs the momentum encoders (no gradient; bf16 autocast like the online model).
    """
    tokens = backbone.tokenize(list(texts))
    if not momentum:
        image_embeds, _ = backbone.encode_image(images)
        return backbone.fuse(image_embeds, tokens), tokens.attention_mask
    with torch.no_grad(), autocast_like(backbone.temp):
        image_embeds = backbone._vision_tokens(backbone.visual_encoder_m, images)
        states = backbone.text_encoder_m(tokens.input_ids, tokens.attention_mask, image_embeds=image_embeds,
                                         mode="multimodal")  # fmt: skip
    return states, tokens.attention_mask


def pair_features(backbone: nn.Module, images: torch.Tensor, texts: Sequence[str], *,
                  momentum: bool = False) -> torch.Tensor:  # fmt: skip
    """Joint features ``[B, feature_dim]`` of each (image, text) pair (see the module docstring)."""
    kind = model_kind(backbone)
    if kind == "fusion":
        return fused_states(backbone, images, texts, momentum=momentum)[0][:, 0]
    if momentum:
        raise ValueError(f"{type(backbone).__name__} has no momentum encoders")
    if kind == "single":
        tokens = backbone.tokenize(list(texts))
        tokens = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return backbone.fuse(images, tokens)["pooled"]
    v = backbone.encode_image(images)
    t = backbone.encode_text(list(texts))
    return torch.cat([v, t, v * t, (v - t).abs()], dim=-1)


class MLPHead(nn.Module):
    """A two-layer head. ``style="vilt"``: Linear(d, 2d) -> LayerNorm -> GELU -> Linear(2d, n) (ViLT's VQA/NLVR2
    classifier); ``style="albef"``: Linear(d, d) -> ReLU -> Linear(d, n) (ALBEF's ``cls_head``)."""

    def __init__(self, dim: int, num_outputs: int, style: str = "vilt") -> None:
        super().__init__()
        if style == "vilt":
            hidden = 2 * dim
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                     nn.Linear(hidden, num_outputs))  # fmt: skip
        elif style == "albef":
            self.net = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, num_outputs))
        else:
            raise ValueError(f"head style must be 'vilt' or 'albef', got {style!r}")
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype)).float()


def head_style(backbone: nn.Module) -> str:
    """ALBEF's head shape for ALBEF/TCL, ViLT's for ViLT and the CLIP baseline."""
    return "albef" if model_kind(backbone) == "fusion" else "vilt"


# ============================================================================ training loader
class ItemLoader(CaptionLoader):
    """The engine's loader protocol over items (one image reference each), with ``index`` = the item's position.

    A :class:`finetune.data.CaptionLoader` (seeded epoch permutation dealt to ranks, exact resume, per-row
    augmentation generators, unreadable images reported and replaced by the next row) with one pseudo-caption per
    item; ``extra(indices)`` adds the task's fields (``text``, targets) to each batch.
    """

    def __init__(self, refs: Sequence[str], store: ImageStore, transform: Any, extra: Callable[[list[int]], dict],
                 *, batch_size: int, seed: int, rank: int, world: int, num_workers: int) -> None:  # fmt: skip
        entries = [Entry(image=ref, captions=[str(i)], key=i) for i, ref in enumerate(refs)]
        self.extra = extra
        super().__init__(entries, store, transform, batch_size=batch_size, seed=seed, rank=rank, world_size=world,
                         num_workers=num_workers)  # fmt: skip

    def on_batch(self, batch: dict[str, Any]) -> None:
        super().on_batch(batch)
        index = batch.pop("image_id")  # CaptionLoader numbers the items 0..N-1 in order
        batch["index"] = index
        batch.update(self.extra(index.tolist()))


# ============================================================================ distributed prediction
def gather_objects(obj: Any, world: int) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` when not distributed): a collective, every rank calls it."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        out: list[Any] = [None] * world
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def predict_items(
    refs: Sequence[str],
    texts: Sequence[str],
    store: ImageStore,
    transform: Callable,
    predict: Callable[[torch.Tensor, list[str]], list[Any]],
    *,
    batch_size: int,
    num_workers: int = 0,
    rank: int = 0,
    world: int = 1,
) -> tuple[list[Any], list[str]]:
    """Predictions for every item (``None`` where its image failed) and the image problems, on every rank.

    Items are dealt round-robin (item ``i`` to rank ``i % world``) and the per-rank predictions gathered by item
    index, so each item is predicted exactly once whatever the world size (no padded duplicates).
    """
    mine = list(range(rank, len(refs), max(1, world)))
    preds: dict[int, Any] = {}
    problems: list[str] = []
    for batch in eval_image_batches([refs[i] for i in mine], store, transform, batch_size, num_workers):
        for local, err in batch["failed"]:
            problems.append(err)
            preds[mine[local]] = None
        if batch["image"] is None:
            continue
        items = [mine[j] for j in batch["index"]]
        out = predict(batch["image"], [texts[i] for i in items])
        preds.update(zip(items, out))
    gathered = gather_objects((preds, problems), world)
    merged: dict[int, Any] = {}
    all_problems: list[str] = []
    for p, probs in gathered:
        merged.update(p)
        all_problems += probs
    for p in all_problems:
        log.warning("evaluation image skipped: %s", p)
    return [merged.get(i) for i in range(len(refs))], all_problems


# ============================================================================ qualitative figure
def write_examples(path: str | Path, rows: Sequence[dict[str, Any]], store: ImageStore, thumb: int = 96,
                   width: int = 420) -> Path | None:  # fmt: skip
    """A PNG with one row per example: the image, then its text lines; framed green/red when ``ok`` is True/False
    (None: no ground truth)."""
    from PIL import Image, ImageDraw

    if not rows:
        return None
    pad = 6
    canvas = Image.new("RGB", (pad * 3 + thumb + width, pad + len(rows) * (thumb + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (thumb + pad)
        try:
            im = store.open(row["image"]).resize((thumb, thumb))
        except Exception:  # a report must not fail on one image
            im = Image.new("RGB", (thumb, thumb), "lightgray")
        canvas.paste(im, (pad, y))
        color = {True: "green", False: "red"}.get(row.get("ok"))
        if color:
            draw.rectangle([pad - 3, y - 3, pad + thumb + 2, y + thumb + 2], outline=color, width=3)
        for j, line in enumerate(row["lines"]):
            draw.text((pad * 2 + thumb, y + 4 + 16 * j), str(line)[:70], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# ============================================================================ engine and report helpers
def unflipped_train_transform(d: Any) -> Any:
    """The training transform (``d``: the ``data`` config) of tasks whose texts name left/right positions (VQA,
    SNLI-VE): never flipped; CLIP recipes a light crop without RandAugment; ``transform: none`` the eval one."""
    from data_prep.transforms import eval_transform, train_transform

    if d.transform == "none":
        return eval_transform(d.image_size, d.mean, d.std)
    scale = (0.9, 1.0) if d.transform == "clip" else tuple(d.crop_scale)
    return train_transform(d.image_size, scale, d.randaugment and d.transform != "clip", d.mean, d.std,
                           flip=False)  # fmt: skip


def load_head_init(backbone: nn.Module, head: str, init: str | None) -> bool | None:
    """Load the weights of the backbone's attribute ``head`` from ``init`` (a fine-tune run's or an export's) for
    ``--eval-only``. ``None`` without an init, else whether ``init`` held any weights of that head."""
    if init in (None, "", "none"):
        return None
    from pretrain.export import load_state

    state = {k.removeprefix("backbone."): v for k, v in load_state(init).items()}
    prefix = f"{head}."
    mine = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if mine:
        getattr(backbone, head).load_state_dict(mine)
    return bool(mine)


class HeadTask:
    """What the image-text classification tasks with one new head on the backbone (VQA, SNLI-VE) share: the config
    fields, the image store, the eval transform, the split files, the unflipped training transform and the head's
    learning-rate groups. A subclass sets ``head_name`` (the backbone attribute of its head)."""

    head_name: str

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        from data_prep.transforms import eval_transform

        self.cfg, self.opts, self.rank, self.world = cfg, cfg.task, rank, world
        self.store = ImageStore(self.opts.image_root or ".")
        d = cfg.data
        self.eval_tf = eval_transform(d.image_size, d.mean, d.std)
        self._items: dict[str, list[Any]] = {}
        self.extras: dict[str, dict[str, Any]] = {}

    def json_of(self, split: str) -> str | None:
        return {"train": self.opts.train_json, "val": self.opts.val_json, "test": self.opts.test_json}[split]

    def train_transform(self) -> Any:
        return unflipped_train_transform(self.cfg.data)  # questions and hypotheses name left/right positions

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]] | None:
        if self.opts.head_lr_mult == 1.0:
            return None
        tc = self.cfg.train
        return head_param_groups(model, tc.weight_decay, tc.lr, self.opts.head_lr_mult, f"backbone.{self.head_name}.")


def example_picks(count: int, n: int) -> list[int]:
    """``n`` evenly spaced indices into ``count`` items (none when ``n`` is 0): the rows of a qualitative figure."""
    return sorted({round(j * count / n) for j in range(n)} & set(range(count))) if n else []


def head_param_groups(model: nn.Module, weight_decay: float, lr: float, head_mult: float,
                      head_prefix: str) -> list[dict[str, Any]]:  # fmt: skip
    """The engine's AdamW groups with the new head's parameters at ``lr * head_mult`` (ViLT's ``lr_mult``)."""
    from pretrain.engine import param_groups

    groups = []
    for g in param_groups(model, weight_decay):
        names = {id(p): n for n, p in model.named_parameters()}
        head = [p for p in g["params"] if names[id(p)].startswith(head_prefix)]
        rest = [p for p in g["params"] if not names[id(p)].startswith(head_prefix)]
        if rest:
            groups.append({**g, "params": rest})
        if head:
            groups.append({**g, "params": head, "lr": lr * head_mult})
    return groups


def results_table(results: dict[str, dict[str, Any]], cols: Sequence[str]) -> str:
    """A fixed-width table of ``cols`` per evaluated split (missing values blank)."""
    widths = [max(8, len(c) + 2) for c in cols]
    lines = ["split".ljust(12) + "".join(c.rjust(w) for c, w in zip(cols, widths))]
    for name, m in results.items():
        if isinstance(m, dict):
            cells = [f"{m[c]:{w}.2f}" if isinstance(m.get(c), (int, float)) else " " * w for c, w in zip(cols, widths)]
            lines.append(name.ljust(12) + "".join(cells))
    return "\n".join(lines)
