"""Image-text retrieval: fine-tuning with image-id-aware ITC (+ ITM for fusion models) and the standard evaluation.

Training (``RetrievalModel``):

* ITC for every model with an embedding space (CLIP, ALBEF, TCL): captions of the same image are all positives,
  targets ``pos / pos.sum(1)`` (ALBEF's ``idx``-aware targets), rows of this rank against the columns of all
  ranks (autograd-aware gather); temperature = the model's (CLIP ``logit_scale``, ALBEF ``temp``). ALBEF/TCL add
  ALBEF's momentum distillation (``task.distill``, :mod:`finetune.distill`): targets ``alpha * softmax(momentum
  similarities) + (1 - alpha) * id targets``, in-batch (ALBEF also keeps a feature queue; we do not).
* ITM for fusion models: per text a hard negative image and per image a hard negative text drawn from the ITC
  similarities, never of the same image id (ALBEF's masking of same-``idx`` pairs); ViLT (no ITC) draws its
  negative images uniformly among other image ids. Loss = ``itc_weight * ITC + itm_weight * ITM``.

Evaluation (``evaluate_retrieval``), over the full split with all captions of every image:

* CLIP: cosine similarity of the normalized embeddings;
* ALBEF/TCL: ITC similarity for all pairs, then the top ``eval.k_test`` candidates of each query are re-scored by
  the fusion encoder; ``eval.score: itm`` uses the raw positive-class ITM logit (ALBEF), ``itm+itc`` adds the ITC
  cosine (LAVIS); candidates outside the top-k score ``-inf``;
* ViLT has no separate embedding space: every pair is scored with ITM (its own protocol), refused above
  ``eval.full_itm_max_pairs`` pairs.

Every rank encodes all images and texts (as ALBEF does), scores disjoint blocks of ``eval.block`` query rows
(dealt round-robin, so each block is computed identically for any world size), and the score matrix is summed
across ranks (exact: other ranks contribute zeros). Similarities are computed one row block at a time; at most
one ``N_images x N_texts`` matrix exists at a time (the text->image matrix of a fusion model is built after the
image->text one is reduced to recalls and freed). Recalls use :func:`finetune.metrics.retrieval_recalls`
(pessimistic ties).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data_prep.transforms import eval_transform, train_transform
from finetune.data import (
    CaptionLoader,
    ImageStore,
    RetrievalSplit,
    eval_image_batches,
    load_split,
    rank_blocks,
    read_annotations,
)
from finetune.distill import Distiller, has_momentum_encoders
from finetune.metrics import chance_recalls, retrieval_recalls
from finetune.report import GridRow, Tile, image_grid, text_table
from finetune.task_module import BackboneTask
from finetune.tasks import TaskOptions, register
from launch.config import ConfigError, exists_field
from pretrain.models.momentum import autocast_like
from pretrain.objectives import hard_negative_itm, idx_contrastive_loss, sample_negatives

log = logging.getLogger("vlp.finetune.retrieval")


@dataclasses.dataclass
class RetrievalOptions(TaskOptions):
    name: str = "retrieval"
    train_json: str | None = exists_field(None)  # annotation files (any format of finetune.data)
    val_json: str | None = exists_field(None)
    test_json: str | None = exists_field(None)
    image_root: str | None = exists_field(None)  # relative image paths and "<shard>.tar/<member>" refs start here
    max_words: int = 30
    itc_weight: float = 1.0
    itm_weight: float = 1.0  # fusion models (ALBEF, TCL, ViLT)
    distill: bool = True  # ALBEF/TCL: ITC targets mixed with the momentum model's (finetune.distill)
    alpha: float = 0.4
    alpha_warmup: bool = True  # ALBEF's retrieval recipe ramps alpha over the first epoch

    def validate(self, recipe: Any) -> None:
        if self.itc_weight < 0 or self.itm_weight < 0:
            raise ConfigError("task.itc_weight / task.itm_weight: must be >= 0")
        if not (self.val_json or self.test_json):
            raise ConfigError("task.val_json / task.test_json: at least one evaluation split is required")
        for split in ("train", "val", "test"):
            check_json_readable(f"task.{split}_json", getattr(self, f"{split}_json"))


def check_json_readable(key: str, path: str | None) -> None:
    """A ConfigError naming ``key`` when ``path`` exists but cannot be read or parsed as JSON (checked before any
    process group starts; a missing file is the schema's own ``path does not exist`` error)."""
    if not path or not os.path.exists(path):
        return
    try:
        with open(path, "rb") as fh:
            json.loads(fh.read())
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{key}: {path} is not valid JSON: {exc}") from exc


# ============================================================================ training objective
@torch.no_grad()
def momentum_features(backbone: nn.Module, images: torch.Tensor, tokens: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF/TCL: normalized ITC features of the momentum encoders (image, text)."""
    with autocast_like(backbone.temp):
        image_m = backbone._vision_tokens(backbone.visual_encoder_m, images)
        image_feat = F.normalize(backbone.vision_proj_m(image_m[:, 0]).float(), dim=-1)
        text_m = backbone.text_encoder_m(tokens.input_ids, tokens.attention_mask, mode="text")
        text_feat = F.normalize(backbone.text_proj_m(text_m[:, 0]).float(), dim=-1)
    return image_feat, text_feat


def model_kind(model: nn.Module) -> str:
    """``dual`` (CLIP-like: embeddings only), ``fusion`` (ALBEF/TCL: embeddings + fusion ITM) or ``single``
    (ViLT: ITM only)."""
    if not hasattr(model, "fuse"):
        return "dual"
    return "fusion" if hasattr(model, "itm_logits") else "single"


class RetrievalModel(BackboneTask):
    """The training module: the pretrained ``backbone`` and the retrieval losses (no new parameters)."""

    def __init__(self, backbone: nn.Module, itc_weight: float = 1.0, itm_weight: float = 1.0,
                 distiller: Distiller | None = None) -> None:  # fmt: skip
        super().__init__(backbone, distiller)  # ALBEF/TCL: the pretrained momentum encoders as ITC teacher
        self.kind = model_kind(backbone)
        self.itc_weight, self.itm_weight = itc_weight, itm_weight
        self.has_momentum = bool(getattr(backbone, "has_momentum", False))

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        bb, images, texts = self.backbone, batch["image"], batch["text"]
        ids = batch["image_id"].to(images.device)
        if self.kind == "dual":
            itc = idx_contrastive_loss(bb.encode_image(images), bb.encode_text(texts), ids, bb.scale())
            return {"loss": self.itc_weight * itc, "losses": {"itc": itc.detach()}}
        if self.kind == "fusion":
            return self._fusion(batch, ids)
        return self._single(images, texts, ids)

    def _fusion(self, batch: dict[str, Any], ids: torch.Tensor) -> dict[str, Any]:
        bb = self.backbone
        tokens = bb.tokenize(batch["text"])
        image_embeds, image_feat = bb.encode_image(batch["image"])
        text_embeds, text_feat = bb.encode_text(tokens)
        temp = bb.temperature()
        momentum, alpha = None, self.distill_alpha(batch)
        if alpha > 0:
            momentum = momentum_features(bb, batch["image"], tokens)
        itc = idx_contrastive_loss(image_feat, text_feat, ids, 1.0 / temp, momentum, alpha)
        same = ids.view(-1, 1) == ids.view(1, -1)  # never a caption of the same image as a negative
        with torch.no_grad():
            sim = image_feat @ text_feat.T / temp
        itm = hard_negative_itm(bb.itm_score, image_embeds, text_embeds, tokens.attention_mask, sim, sim.T, same).loss
        loss = self.itc_weight * itc + self.itm_weight * itm
        return {"loss": loss, "losses": {"itc": itc.detach(), "itm": itm.detach()}}

    def _single(self, images: torch.Tensor, texts: list[str], ids: torch.Tensor) -> dict[str, Any]:
        bb = self.backbone
        tokens = bb.tokenize(texts)
        tokens = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        bsz = images.shape[0]
        if bsz > 1:
            same = ids.view(-1, 1) == ids.view(1, -1)
            neg = sample_negatives(torch.zeros(bsz, bsz, device=images.device), same)
            images = torch.cat([images, images[neg]])
            tokens = {k: torch.cat([v, v]) for k, v in tokens.items()}
        logits = bb.itm_head(bb.fuse(images, tokens)["pooled"]).float()
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:bsz] = 1
        itm = F.cross_entropy(logits, labels)
        return {"loss": self.itm_weight * itm, "losses": {"itm": itm.detach()}}


# ============================================================================ evaluation: model adapters
def _pad_cat(parts: Sequence[torch.Tensor], value: float = 0) -> torch.Tensor:
    """Concatenate ``[B_i, L_i, ...]`` tensors along dim 0, right-padding dim 1 to the longest ``L``."""
    length = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, [0, 0] * (p.dim() - 2) + [0, length - p.shape[1]], value=value) for p in parts])


class Adapter:
    """How the evaluator talks to a model: per-batch features, and ITM scores of (image, text) index pairs."""

    kind = "dual"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"emb": self.model.encode_image(images.to(self.device)).float().cpu()}

    def text_features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {"emb": self.model.encode_text(texts).float().cpu()}

    def itm(self, img: dict, img_idx: torch.Tensor, txt: dict, txt_idx: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self.model).__name__} has no ITM head")

    @staticmethod
    def cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Join per-batch features; token-level ones (all but ``emb``) are right-padded to the longest batch
        (zero states, mask 0, pad id 0), which attention masking makes inert."""
        if not parts:
            return {}
        return {
            k: torch.cat([p[k] for p in parts]) if k == "emb" else _pad_cat([p[k] for p in parts]) for k in parts[0]
        }


class FusionAdapter(Adapter):
    """ALBEF/TCL: normalized ITC embeddings plus the token states the fusion encoder re-ranks with."""

    kind = "fusion"

    def image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, emb = self.model.encode_image(images.to(self.device))
        return {"emb": emb.float().cpu(), "tokens": tokens.cpu()}

    def text_features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        toks = self.model.tokenize(texts)
        states, emb = self.model.encode_text(toks)
        return {"emb": emb.float().cpu(), "states": states.cpu(), "mask": toks.attention_mask.cpu()}

    def itm(self, img: dict, img_idx: torch.Tensor, txt: dict, txt_idx: torch.Tensor) -> torch.Tensor:
        dev = self.device
        fused = self.model.fuse(
            img["tokens"][img_idx].to(dev), (txt["states"][txt_idx].to(dev), txt["mask"][txt_idx].to(dev))
        )
        return self.model.itm_logits(fused)[:, 1].float().cpu()


class SingleAdapter(Adapter):
    """ViLT: patch tokens and token ids; every score comes from the ITM head over the joint encoding."""

    kind = "single"

    def image_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"tokens": self.model.encode_image(images.to(self.device)).cpu()}

    def text_features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        toks = self.model.tokenize(texts)
        return {"input_ids": toks["input_ids"].cpu(), "mask": toks["attention_mask"].cpu()}

    def itm(self, img: dict, img_idx: torch.Tensor, txt: dict, txt_idx: torch.Tensor) -> torch.Tensor:
        dev = self.device
        tokens = {"input_ids": txt["input_ids"][txt_idx].to(dev), "attention_mask": txt["mask"][txt_idx].to(dev)}
        out = self.model.fuse(img["tokens"][img_idx].to(dev), tokens)
        return self.model.itm_head(out["pooled"])[:, 1].float().cpu()


def adapter_for(model: nn.Module) -> Adapter:
    """The evaluation adapter of ``model`` (a backbone, not the training wrapper)."""
    return {"dual": Adapter, "fusion": FusionAdapter, "single": SingleAdapter}[model_kind(model)](model)


# ============================================================================ evaluation: scoring
def encode_split(
    adapter: Adapter,
    split: RetrievalSplit,
    store: ImageStore,
    transform: Callable,
    batch_size: int,
    num_workers: int = 0,
) -> tuple[RetrievalSplit, dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """Features of every image and text; unreadable images are reported and dropped with their captions."""
    parts, failed, problems = [], [], []
    for batch in eval_image_batches(split.images, store, transform, batch_size, num_workers):
        failed += [i for i, _ in batch["failed"]]
        problems += [err for _, err in batch["failed"]]
        if batch["image"] is not None:
            parts.append(adapter.image_features(batch["image"]))
    for p in problems:
        log.warning("evaluation image skipped: %s", p)
    if failed:
        split = split.drop_images(failed)
    if not split.images:
        raise RuntimeError(f"no readable evaluation image ({len(problems)} failed; first: {problems[:1]})")
    img = type(adapter).cat(parts)
    txt_parts = [adapter.text_features(split.texts[s : s + batch_size]) for s in range(0, len(split.texts), batch_size)]
    return split, img, type(adapter).cat(txt_parts), problems


def score_matrix(
    adapter: Adapter,
    img: dict[str, torch.Tensor],
    txt: dict[str, torch.Tensor],
    direction: str,
    *,
    k: int,
    score: str = "itm",
    rank: int = 0,
    world: int = 1,
    block: int = 256,
    rerank_batch: int = 128,
) -> torch.Tensor:
    """This rank's rows of the ``direction`` (``i2t`` or ``t2i``) score matrix; other rows are zero.

    Summing the results of ranks ``0..world-1`` gives the full matrix. Dual models: cosine similarity. Fusion:
    ITC top-``k`` re-scored by ITM (``score``: ``itm`` or ``itm+itc``), ``-inf`` elsewhere. Single-stream: ITM for
    every pair (``direction`` must be ``i2t``; the t2i matrix is its transpose).
    """
    queries, cands = (img, txt) if direction == "i2t" else (txt, img)
    n_q = len(next(iter(queries.values())))
    n_c = len(next(iter(cands.values())))
    out = torch.zeros(n_q, n_c)
    blocks = rank_blocks(n_q, block, rank, world)
    kind = adapter.kind

    def pair_scores(qs: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """ITM scores of the pairs (qs[j], cols[j]), ``rerank_batch`` pairs per fusion forward."""
        chunks = []
        for s in range(0, len(cols), rerank_batch):
            q, c = qs[s : s + rerank_batch], cols[s : s + rerank_batch]
            chunks.append(adapter.itm(img, q, txt, c) if direction == "i2t" else adapter.itm(img, c, txt, q))
        return torch.cat(chunks)

    if kind == "single":
        if direction != "i2t":
            raise ValueError("single-stream models score each pair once: use direction='i2t' and transpose")
        for rows in blocks:
            qs = torch.arange(rows.start, rows.stop).repeat_interleave(n_c)
            out[rows.start : rows.stop] = pair_scores(qs, torch.arange(n_c).repeat(len(rows))).view(len(rows), n_c)
        return out
    kk = min(k, n_c)
    for rows in blocks:
        start, stop = rows.start, rows.stop
        sims = queries["emb"][start:stop] @ cands["emb"].T  # one [block, N] slice at a time
        if kind == "dual":
            out[start:stop] = sims
            continue
        top_v, top_i = sims.topk(kk, dim=1)
        # all pairs of the block batched together (blocks are fixed whatever the world size: deterministic)
        qs = torch.arange(start, stop).repeat_interleave(kk)
        scores = pair_scores(qs, top_i.reshape(-1)).view(stop - start, kk)
        if score == "itm+itc":
            scores = scores + top_v
        block_out = torch.full((stop - start, n_c), float("-inf"))
        block_out.scatter_(1, top_i, scores)
        out[start:stop] = block_out
    return out


def _reduce(matrix: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1 and dist.is_available() and dist.is_initialized():
        # -inf + 0 = -inf and x + 0 = x: the sum of disjoint rows is exact
        dist.all_reduce(matrix, op=dist.ReduceOp.SUM)
    return matrix


def _gt_rank(scores: torch.Tensor, positives: Sequence[int]) -> int:
    """0-based rank of the best positive (pessimistic ties, as in finetune.metrics)."""
    pos = torch.as_tensor(list(positives))
    best = scores[pos].max()
    is_pos = torch.zeros_like(scores, dtype=torch.bool)
    is_pos[pos] = True
    return int((scores > best).sum() + ((scores == best) & ~is_pos).sum())


def _queries(t2i_rows: dict[int, torch.Tensor], split: RetrievalSplit, top: int = 5) -> list[dict[str, Any]]:
    out = []
    for t, scores in sorted(t2i_rows.items()):
        order = torch.sort(scores, descending=True, stable=True).indices[:top].tolist()
        gt = split.txt2img[t]
        out.append({"text": split.texts[t], "gt_image": gt, "gt_rank": _gt_rank(scores, [gt]) + 1, "top": order})
    return out


def evaluate_retrieval(
    adapter: Adapter,
    split: RetrievalSplit,
    store: ImageStore,
    transform: Callable,
    ecfg: Any,
    *,
    rank: int = 0,
    world: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(metrics, extras) of ``adapter``'s model on ``split``; extras hold qualitative queries and the split used."""
    split, img, txt, problems = encode_split(adapter, split, store, transform, ecfg.batch_size, ecfg.num_workers)
    n_i, n_t = len(split.images), len(split.texts)
    ks = tuple(ecfg.ks)
    q = int(getattr(ecfg, "qualitative", 0))
    picks = sorted({round(j * n_t / q) for j in range(q)} & set(range(n_t))) if q else []
    opts = {"k": ecfg.k_test, "score": ecfg.score, "rank": rank, "world": world, "block": ecfg.block,
            "rerank_batch": ecfg.rerank_batch}  # fmt: skip
    if adapter.kind == "single" and n_i * n_t > ecfg.full_itm_max_pairs:
        raise RuntimeError(
            f"ViLT retrieval scores every pair with ITM: {n_i} x {n_t} = {n_i * n_t} pairs exceeds "
            f"eval.full_itm_max_pairs={ecfg.full_itm_max_pairs}; raise it or evaluate on fewer images"
        )
    i2t = _reduce(score_matrix(adapter, img, txt, "i2t", **opts), world)
    if adapter.kind in ("dual", "single"):
        metrics = retrieval_recalls(i2t, split.img2txt, split.txt2img, ks)
        rows = {t: i2t[:, t].clone() for t in picks}
        del i2t
    else:
        tr = retrieval_recalls(i2t, split.img2txt, split.txt2img, ks)
        del i2t  # free it before building the text->image matrix
        t2i = _reduce(score_matrix(adapter, img, txt, "t2i", **opts), world)
        ir = retrieval_recalls(t2i.T, split.img2txt, split.txt2img, ks)
        rows = {t: t2i[t].clone() for t in picks}
        del t2i
        metrics = {**{k: v for k, v in tr.items() if k.startswith("txt_r")},
                   **{k: v for k, v in ir.items() if k.startswith("img_r")}}  # fmt: skip
        metrics["txt_r_mean"] = sum(metrics[f"txt_r{k}"] for k in ks) / len(ks)
        metrics["img_r_mean"] = sum(metrics[f"img_r{k}"] for k in ks) / len(ks)
        metrics["rsum"] = sum(metrics[f"txt_r{k}"] + metrics[f"img_r{k}"] for k in ks)
        metrics["r_mean"] = (metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2
    cpi = max(1, round(split.captions_per_image))
    metrics["chance_rsum"] = chance_recalls(n_i, cpi, ks)["rsum"]
    metrics["num_images"], metrics["num_texts"] = n_i, n_t
    metrics["skipped_images"] = len(problems)
    extras = {"queries": _queries(rows, split), "split": split}
    return metrics, extras


# ============================================================================ qualitative report
def write_qualitative(path: str | Path, queries: list[dict[str, Any]], split: RetrievalSplit, store: ImageStore,
                      thumb: int = 96) -> Path | None:  # fmt: skip
    """A PNG grid: one row per text query, its top-5 images (ground truth framed green) and, when the ground truth
    is not among them, the ground truth itself framed red with its rank."""
    top = max((len(q["top"]) for q in queries), default=0)

    def tile(index: int, caption: str, frame: str | None = None) -> Tile:
        try:
            image = store.open(split.images[index])
        except Exception:  # a report must not fail on one image: a grey tile stands in
            image = None
        return Tile(image, caption, frame)

    rows = []
    for r, q in enumerate(queries):
        tiles: list[Tile | None] = [
            tile(idx, f"#{c + 1}" + (" GT" if idx == q["gt_image"] else ""), "green" if idx == q["gt_image"] else None)
            for c, idx in enumerate(q["top"])
        ]
        if q["gt_image"] not in q["top"]:
            tiles += [None] * (top - len(tiles)) + [tile(q["gt_image"], f"GT #{q['gt_rank']}", "red")]
        rows.append(GridRow(f"{r + 1}. {q['text'][:100]}  (ground truth rank {q['gt_rank']})", tiles))
    return image_grid(path, rows, thumb)


# ============================================================================ the task
@register("retrieval", RetrievalOptions)
class RetrievalTask:
    """Retrieval fine-tuning and evaluation for the shared engine (see the module docstring)."""

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.opts, self.rank, self.world = cfg, cfg.task, rank, world
        self.store = ImageStore(self.opts.image_root or ".")
        d = cfg.data
        self.eval_tf = eval_transform(d.image_size, d.mean, d.std)
        self._splits: dict[str, RetrievalSplit] = {}
        self.extras: dict[str, dict[str, Any]] = {}

    def json_of(self, split: str) -> str | None:
        return {"train": self.opts.train_json, "val": self.opts.val_json, "test": self.opts.test_json}[split]

    def build_model(self, backbone: nn.Module) -> RetrievalModel:
        distiller = None
        if self.opts.distill and model_kind(backbone) == "fusion" and has_momentum_encoders(backbone):
            distiller = Distiller(backbone, [], momentum=backbone.opts.momentum, alpha=self.opts.alpha,
                                  warmup=self.opts.alpha_warmup)  # fmt: skip
        return RetrievalModel(backbone, self.opts.itc_weight, self.opts.itm_weight, distiller)

    def train_loader(self) -> CaptionLoader:
        if not self.opts.train_json:
            raise ConfigError("task.train_json: required for fine-tuning (or pass --eval-only)")
        d = self.cfg.data
        if d.transform == "none":
            tf = eval_transform(d.image_size, d.mean, d.std)
        elif d.transform == "clip":
            tf = train_transform(d.image_size, (0.9, 1.0), False, d.mean, d.std, flip=False)
        else:
            tf = train_transform(d.image_size, tuple(d.crop_scale), d.randaugment, d.mean, d.std)
        entries, _ = read_annotations(self.opts.train_json, "train", self.opts.max_words)
        return CaptionLoader(entries, self.store, tf, batch_size=d.batch_size, seed=self.cfg.run.seed,
                             rank=self.rank, world_size=self.world, num_workers=d.num_workers)  # fmt: skip

    def split(self, name: str) -> RetrievalSplit:
        if name not in self._splits:
            path = self.json_of(name)
            if not path:
                raise ConfigError(f"task.{name}_json: not set, cannot evaluate split {name!r}")
            self._splits[name] = load_split(path, name, self.opts.max_words)
        return self._splits[name]

    def available_splits(self) -> list[str]:
        return [s for s in ("val", "test") if self.json_of(s)]

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        was = backbone.training
        backbone.eval()
        try:
            metrics, extras = evaluate_retrieval(
                adapter_for(backbone), self.split(split), self.store, self.eval_tf, self.cfg.eval,
                rank=self.rank, world=self.world,
            )  # fmt: skip
        finally:
            backbone.train(was)
        self.extras[split] = extras
        return metrics

    def table(self, results: dict[str, dict[str, Any]]) -> str:
        """TR@k / IR@k / RSUM per evaluated split."""
        ks = self.cfg.eval.ks
        columns = [(f"txt_r{k}", f"TR@{k}") for k in ks] + [(f"img_r{k}", f"IR@{k}") for k in ks]
        return text_table(results, [*columns, ("rsum", "RSUM"), ("chance_rsum", "chance")])

    def report(self, metrics: dict[str, Any], split: str, out_dir: str | Path) -> list[Path]:
        extras = self.extras.get(split)
        if not extras:
            return []
        png = write_qualitative(Path(out_dir) / f"retrieval_{split}_queries.png", extras["queries"], extras["split"],
                                self.store)  # fmt: skip
        return [png] if png else []
