"""NLVR2: is a statement true of a pair of images? Heads for all four models, the text-assignment pre-step, and
the official accuracy / consistency metrics.

Data (:func:`read_nlvr2`, format detected from the file):

* the official JSON-lines files (``train.json``, ``dev.json``, ``test1.json``): one object per line with ``sentence``,
  ``label`` ("True"/"False"), ``identifier`` = ``split-set_id-pair_id-sentence_id``; the images are
  ``<split-set_id-pair_id>-img0.png`` (left) and ``-img1.png`` (right), under ``directory/`` when a row has one
  (the train layout);
* ALBEF's ``nlvr_{train,dev,test}.json``: a JSON list of ``{"images": [left, right], "sentence", "label"}``;
* the synthetic set's ``{split}_scenes.jsonl``: pairs of scenes with statements derived by
  :func:`data_prep.sources.synthetic.nlvr_statements` (half true), ``task.synthetic_pairs`` right images per left
  image, so a statement is judged on several pairs (what consistency measures).

Images are decoded by content (an NLVR2 ``.png`` is often a JPEG). A malformed row is reported with its file and
line and skipped; an unreadable image is reported, its training row replaced by the next readable one, its
evaluation pair counted in ``skipped_pairs``.

Heads (attached to the backbone so the best-checkpoint keeper saves them):

* ALBEF / TCL (``task.pairing``): ``paired`` = ALBEF's ``model_nlvr`` encoder (every fusion layer duplicated, one
  copy per image, cross-attention key/value tied within a pair: :func:`pretrain.models.fusion.pair_fusion_layers`);
  ``alternate`` = the unpaired encoder routing fusion layers to the images in turn; ``concat`` = every fusion layer
  attends to both images' tokens. ``nlvr_head`` = Linear(H, H) -> ReLU -> Linear(H, 2) on the fused [CLS]; loss
  ``(1 - a) CE + a soft-CE`` against a momentum (EMA) teacher of the vision encoder, fusion encoder and head, built
  **after** the pretrained weights are loaded (ALBEF's script copies before loading, so its teacher starts random),
  ``a = task.alpha`` ramped over the first epoch.
* ViLT: the "pair" method: two passes with image token types 1 and 2 (row 2 starts from row 1), pooled features
  concatenated, Linear(2D, 2D) -> LayerNorm -> GELU -> Linear(2D, 2).
* CLIP: late fusion, an MLP over ``[f(L); f(R); g(T); f(L) * g(T); f(R) * g(T)]`` (a baseline; no cross-modal
  attention).

``task.stage: ta`` is ALBEF's text-assignment pre-step (ALBEF/TCL, paired encoder): on caption data (a retrieval
annotation file), each caption is fused with two images: its own and a hard negative drawn from the image-image
similarity (label 0 when its image is on the left, 1 on the right; probability 2/3), or two hard negatives (label 2);
``ta_head`` Linear(H, 3). Its run is then ``model.init`` of the NLVR2 stage; weights of a paired encoder are
recognised and loaded after the surgery.

Metrics: ``accuracy`` and the official ``consistency`` (the share of unique sentences, identifier with the pair id
blanked, whose every pair is predicted correctly), ``chance`` (the majority label's share), ``num_pairs``,
``skipped_pairs``. ``report`` writes the official predictions CSV (``identifier,label``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from data_prep.transforms import eval_transform, pre_caption, train_transform
from finetune.data import CaptionLoader, Entry, ImageError, ImageStore, read_annotations, usable_rows
from finetune.pairs import gather_objects
from finetune.task_module import BackboneTask
from finetune.tasks import TaskOptions, register
from finetune.tasks.retrieval import model_kind
from launch.config import ConfigError, exists_field

log = logging.getLogger("vlp.finetune.nlvr2")

HEAD = "nlvr_head"
TA_HEAD = "ta_head"
SCENES_SUFFIX = "_scenes.jsonl"


@dataclasses.dataclass
class Nlvr2Options(TaskOptions):
    name: str = "nlvr2"
    stage: Literal["nlvr", "ta"] = "nlvr"  # ta: ALBEF's text-assignment pre-step (on caption data)
    train_json: str | None = exists_field(None)  # official JSON-lines, ALBEF json, or synthetic *_scenes.jsonl
    val_json: str | None = exists_field(None)  # dev (selection)
    test_json: str | None = exists_field(None)  # test-P
    image_root: str | None = exists_field(None)
    max_words: int = 30
    pairing: Literal["paired", "alternate", "concat"] = "paired"  # ALBEF/TCL: how fusion sees two images
    distill: bool = True  # ALBEF/TCL: momentum distillation
    alpha: float = 0.4
    momentum: float = 0.995
    swap_prob: float = 0.0  # BLIP/LAVIS: swap the two images and the words left/right (0: ALBEF, off)
    synthetic_pairs: int = 2  # synthetic: right images per left image (a statement is judged on each)
    synthetic_statements: int = 4  # synthetic: statements per pair (half true)
    synthetic_seed: int = 0

    def validate(self, recipe: Any) -> None:
        if not (self.val_json or self.test_json):
            raise ConfigError("task.val_json / task.test_json: at least one evaluation split is required")
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.momentum < 1.0:
            raise ConfigError("task.alpha must be in [0, 1] and task.momentum in [0, 1)")
        if not 0.0 <= self.swap_prob <= 1.0:
            raise ConfigError("task.swap_prob: must be in [0, 1]")
        if self.synthetic_pairs < 1 or self.synthetic_statements < 2:
            raise ConfigError("task.synthetic_pairs >= 1 and task.synthetic_statements >= 2")
        if hasattr(recipe, "eval"):
            self._check_recipe(recipe)

    def _check_recipe(self, cfg: Any) -> None:
        wanted = ("ta_accuracy",) if self.stage == "ta" else ("accuracy", "consistency")
        if cfg.eval.metric not in wanted:
            raise ConfigError(f"eval.metric: the nlvr2 {self.stage} stage reports {wanted}, got {cfg.eval.metric!r}")
        if cfg.mixgen.enabled:
            raise ConfigError("mixgen.enabled: MixGen is a pretraining augmentation; NLVR2 fine-tuning runs without it")
        model = cfg.model.get("name") if isinstance(cfg.model, dict) else getattr(cfg.model, "name", None)
        if self.stage == "ta" and model not in ("albef", "tcl"):
            raise ConfigError("task.stage: the text-assignment pre-step is ALBEF/TCL's (a fusion encoder)")


# ============================================================================ data
@dataclasses.dataclass
class PairRow:
    """One NLVR2 example."""

    left: str
    right: str
    sentence: str
    label: int  # 1 = "True"
    identifier: str


def _label(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if isinstance(value, int) and value in (0, 1):
        return value
    return None


_PAIR_IMAGE = re.compile(r"^(?P<pair>.+)-img[01]\.\w+$")


def consistency_key(identifier: str) -> str:
    """The sentence an identifier belongs to: ``split-set_id-pair_id-sentence_id`` with the pair id blanked."""
    parts = identifier.split("-")
    if len(parts) >= 4:
        return "-".join(parts[:-2] + ["*", parts[-1]])
    return identifier


def _official_rows(path: str, text: str, max_words: int, problems: list[str]) -> list[PairRow]:
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg}); skipped")
            continue
        ident = item.get("identifier") if isinstance(item, dict) else None
        label = _label(item.get("label")) if isinstance(item, dict) else None
        sentence = pre_caption(item["sentence"], max_words) if isinstance(item, dict) and isinstance(
            item.get("sentence"), str) else ""  # fmt: skip
        if not isinstance(ident, str) or ident.count("-") < 3 or label is None or not sentence:
            problems.append(f"{where}: needs identifier 'split-set-pair-sentence', label True/False, sentence; skipped")
            continue
        pair = ident.rsplit("-", 1)[0]
        folder = item.get("directory")
        prefix = f"{folder}/" if isinstance(folder, (str, int)) and str(folder) else ""
        rows.append(PairRow(f"{prefix}{pair}-img0.png", f"{prefix}{pair}-img1.png", sentence, label, ident))
    return rows


def _albef_rows(path: str, items: list[Any], split: str, max_words: int, problems: list[str]) -> list[PairRow]:
    rows = []
    for i, item in enumerate(items):
        where = f"{path}: row {i}"
        images = item.get("images") if isinstance(item, dict) else None
        label = _label(item.get("label")) if isinstance(item, dict) else None
        raw = item.get("sentence") if isinstance(item, dict) else None
        sentence = pre_caption(raw, max_words) if isinstance(raw, str) else ""
        if not (isinstance(images, list) and len(images) == 2 and all(isinstance(x, str) and x for x in images)):
            problems.append(f"{where}: 'images' must be [left, right] paths; skipped")
            continue
        if label is None or not sentence:
            problems.append(f"{where}: needs a non-empty 'sentence' and label True/False; skipped")
            continue
        ident = item.get("identifier")
        if not isinstance(ident, str):
            # ALBEF's files drop the identifier: rebuild set and sentence from the image name when it has NLVR2's
            m = _PAIR_IMAGE.match(Path(images[0]).name)
            ident = f"{m.group('pair')}-{sentence}" if m else f"{split}-{i}-0-{i}"
        rows.append(PairRow(images[0], images[1], sentence, label, ident))
    return rows


def synthetic_rows(path: str, split: str, *, pairs: int, statements: int, seed: int, max_words: int,
                   problems: list[str]) -> list[PairRow]:  # fmt: skip
    """Pairs of synthetic scenes with derived statements (deterministic in ``seed`` and ``split``).

    Left image ``i`` is paired with ``pairs`` other images of the split; each pair gets ``statements`` statements
    (half true). A statement that recurs in two pairs of the same left image shares its sentence id, so
    consistency groups it (identifier ``split-i-p-s``).
    """
    from data_prep.sources.synthetic import nlvr_statements, scene_from_dict

    scenes, refs = [], []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            scenes.append(scene_from_dict(item["scene"]))
            refs.append(f"{item['shard']}/{item['key']}.jpg")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{path}:{line_no}: not a scene row ({exc}); skipped")
    if len(scenes) < 2:
        return []
    rng = random.Random(f"nlvr2/{seed}/{split}")
    rows: list[PairRow] = []
    for i in range(len(scenes)):
        partners = rng.sample([j for j in range(len(scenes)) if j != i], min(pairs, len(scenes) - 1))
        sentence_ids: dict[str, int] = {}
        for p, j in enumerate(partners):
            for text, truth in nlvr_statements(scenes[i], scenes[j], rng, n=statements):
                sid = sentence_ids.setdefault(text, len(sentence_ids))
                rows.append(
                    PairRow(refs[i], refs[j], pre_caption(text, max_words), int(truth), f"{split}-{i}-{p}-{sid}")
                )
    return rows


def read_nlvr2(path: str, split: str, max_words: int = 30, **synthetic: Any) -> tuple[list[PairRow], list[str]]:
    """(rows, problems) of an NLVR2 file in any supported format (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"NLVR2 annotation file not found: {p}")
    problems: list[str] = []
    if p.name.endswith(SCENES_SUFFIX):
        opts = {"pairs": 2, "statements": 4, "seed": 0, **synthetic}
        rows = synthetic_rows(str(p), split, max_words=max_words, problems=problems, **opts)
    else:
        text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON-lines (the official files)
        if isinstance(data, list):
            rows = _albef_rows(str(p), data, split, max_words, problems)
        elif data is None or isinstance(data, dict):
            rows = _official_rows(str(p), text, max_words, problems)
        else:
            raise ValueError(f"{p}: expected JSON lines or a JSON list of rows")
    return usable_rows(p, rows, problems, "NLVR2 row", log)


class PairStore:
    """``open(str(i))`` -> (left, right) RGB images of row ``i`` (the shared loader's store protocol)."""

    def __init__(self, rows: Sequence[PairRow], store: ImageStore) -> None:
        self.rows, self.store = list(rows), store

    def open(self, ref: str) -> tuple[Any, Any]:
        row = self.rows[int(ref)]
        return self.store.open(row.left), self.store.open(row.right)


class PairTransform:
    """Applies an image transform to both images of a pair: ``[2, 3, H, W]``."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, pair: tuple[Any, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.stack([self.transform(pair[0], generator), self.transform(pair[1], generator)])


_SWAP = {"left": "right", "right": "left"}


def swap_sides(text: str) -> str:
    """Swap the words ``left`` and ``right`` (BLIP/LAVIS's companion to swapping the images)."""
    return re.sub(r"\b(left|right)\b", lambda m: _SWAP[m.group(1)], text)


class PairLoader:
    """Training batches ``{"image": [B, 2, 3, H, W], "text", "label", "row"}`` over the shared :class:`CaptionLoader`
    (its permutation, rank split, bad-image replacement and exact resume), plus the optional swap augmentation drawn
    from (seed, epoch, row) so a resumed run swaps identically."""

    def __init__(self, rows: Sequence[PairRow], store: ImageStore, transform: Any, *, batch_size: int, seed: int,
                 rank: int, world: int, num_workers: int, swap_prob: float = 0.0) -> None:  # fmt: skip
        entries = [Entry(str(i), [r.sentence], i) for i, r in enumerate(rows)]
        self.labels = torch.tensor([r.label for r in rows], dtype=torch.long)
        self.seed, self.swap_prob = seed, swap_prob
        self.inner = CaptionLoader(entries, PairStore(rows, store), PairTransform(transform), batch_size=batch_size,
                                   seed=seed, rank=rank, world_size=world, num_workers=num_workers)  # fmt: skip

    steps_per_epoch = property(lambda self: self.inner.steps_per_epoch)
    skipped = property(lambda self: self.inner.skipped)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            rows = batch.pop("image_id")  # CaptionLoader's id = the row index (keys 0..N-1 in order)
            batch["label"] = self.labels[rows]
            batch["row"] = rows
            if self.swap_prob > 0:
                epoch = self.inner._epoch
                for b, r in enumerate(rows.tolist()):
                    if random.Random(f"swap/{self.seed}/{epoch}/{r}").random() < self.swap_prob:
                        batch["image"][b] = batch["image"][b].flip(0)
                        batch["text"][b] = swap_sides(batch["text"][b])
            yield batch


# ============================================================================ heads and logits
def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def fusion_pair_logits(visual: nn.Module, text_encoder: nn.Module, head: nn.Module, tokens: Any,
                       images: torch.Tensor, pair_mode: str) -> torch.Tensor:  # fmt: skip
    """ALBEF/TCL logits for ``images`` ``[B, 2, 3, H, W]``: both images through the ViT as one batch, then the
    fusion encoder over [left, right] (the modules are passed so the momentum teacher runs the same code)."""
    bsz = images.shape[0]
    embeds = visual.forward_features(images.flatten(0, 1).to(_dtype(visual)))
    embeds = embeds.view(bsz, 2, *embeds.shape[1:])
    text = text_encoder(tokens.input_ids, tokens.attention_mask, mode="text")
    fused = text_encoder(attention_mask=tokens.attention_mask, hidden_states=text,
                         image_embeds=[embeds[:, 0], embeds[:, 1]], mode="fusion", pair_mode=pair_mode)  # fmt: skip
    return head(fused[:, 0]).float()


def pair_logits(backbone: nn.Module, images: torch.Tensor, texts: list[str], pair_mode: str) -> torch.Tensor:
    """NLVR2 logits ``[B, 2]`` of any model (its ``nlvr_head`` must exist: see :meth:`Nlvr2Task.prepare`)."""
    kind = model_kind(backbone)
    head = getattr(backbone, HEAD)
    if kind == "fusion":
        return fusion_pair_logits(backbone.visual_encoder, backbone.text_encoder, head, backbone.tokenize(texts),
                                  images, pair_mode)  # fmt: skip
    if kind == "single":
        tokens = backbone.tokenize(texts)
        tokens = {k: tokens[k] for k in ("input_ids", "attention_mask")}
        out = backbone.fuse([images[:, 0], images[:, 1]], tokens)
        return head(out["pooled"]).float()
    left, right = backbone.encode_image(images[:, 0]), backbone.encode_image(images[:, 1])
    text = backbone.encode_text(texts)
    return head(torch.cat([left, right, text, left * text, right * text], dim=-1).to(_dtype(head))).float()


def build_head(backbone: nn.Module) -> nn.Module:
    """The NLVR2 classifier of each model family (see the module docstring)."""
    kind = model_kind(backbone)
    if kind == "fusion":
        h = backbone.text_encoder.config.hidden_size
        head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
    elif kind == "single":
        d = 2 * backbone.hidden_size
        head = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.GELU(), nn.Linear(d, 2))
    else:
        e = backbone.text_proj.out_features
        head = nn.Sequential(nn.Linear(5 * e, 2 * e), nn.ReLU(), nn.Linear(2 * e, 2))
    for m in head.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
    return head


def soft_ce(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_c softmax(target)[b, c] * log_softmax(logits)[b, c]``."""
    return -(F.softmax(target_logits.float(), dim=1) * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class Nlvr2Model(BackboneTask):
    """Training module: the prepared backbone (with ``nlvr_head``), CE, and for ALBEF/TCL a momentum teacher."""

    def __init__(self, backbone: nn.Module, pair_mode: str, *, distill: bool, alpha: float, momentum: float) -> None:
        super().__init__(backbone)
        from pretrain.models.momentum import MomentumModules, copy_params, momentum_copy

        self.kind = model_kind(backbone)
        self.pair_mode, self.alpha, self.m = pair_mode, alpha, momentum
        self.distill = distill and self.kind == "fusion"
        if self.distill:
            # built now, after the pretrained (or TA) weights are in: the teacher starts as the student
            self.teacher = MomentumModules({
                "visual_encoder": momentum_copy(backbone.visual_encoder),
                "text_encoder": momentum_copy(backbone.text_encoder),
                HEAD: momentum_copy(getattr(backbone, HEAD)),
            })  # fmt: skip
            copy_params(self._pairs())

    def _pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        from pretrain.models.momentum import momentum_pairs

        names = ("visual_encoder", "text_encoder", HEAD)
        return momentum_pairs([getattr(self.backbone, n) for n in names], [self.teacher[n] for n in names])

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pretrain.models.momentum import autocast_like
        from pretrain.objectives import ramp_alpha

        images, texts, labels = batch["image"], batch["text"], batch["label"]
        logits = pair_logits(self.backbone, images, texts, self.pair_mode)
        labels = labels.to(logits.device)
        ce = F.cross_entropy(logits, labels)
        losses = {"ce": ce.detach()}
        loss = ce
        if self.distill:
            alpha = ramp_alpha(self.alpha, batch.get("step"), batch.get("updates_per_epoch"))
            self.mark_ema_due()
            with torch.no_grad(), autocast_like(next(self.backbone.parameters())):
                t = self.teacher
                target = fusion_pair_logits(t["visual_encoder"], t["text_encoder"], t[HEAD],
                                            self.backbone.tokenize(texts), images, self.pair_mode)  # fmt: skip
            distill = soft_ce(logits, target)
            loss = (1.0 - alpha) * ce + alpha * distill
            losses["distill"] = distill.detach()
        acc = (logits.argmax(1) == labels).float().mean().detach()
        return {"loss": loss, "losses": losses, "stats": {"train_acc": acc}}

    @torch.no_grad()
    def momentum_step(self) -> None:
        from pretrain.models.momentum import ema_update

        if self.distill:
            ema_update(self._pairs(), self.m)


# ============================================================================ text assignment (TA) pre-step
def ta_assignments(sim: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """ALBEF's TA draw for captions of a batch: (left index, right index, label) per caption ``b``.

    ``sim`` ``[B, B]``: image-image similarities. With probability 2/3 one hard image ``j != b`` is drawn from
    ``softmax(sim[b])`` and (b, j) placed in random order (label 0: caption's image on the left, 1: right); else two
    distinct hard images (neither ``b``) and label 2. Needs ``B >= 3``.
    """
    bsz = sim.shape[0]
    if bsz < 3:
        raise ValueError(f"text assignment needs a batch of at least 3, got {bsz}")
    weights = F.softmax(torch.nan_to_num(sim.detach().float()), dim=1)
    weights = weights.masked_fill(torch.eye(bsz, dtype=torch.bool, device=sim.device), 0.0).cpu() + 1e-12
    weights.fill_diagonal_(0.0)
    draws = torch.multinomial(weights, 2, replacement=False, generator=generator)
    u = torch.rand(bsz, generator=generator)
    side = torch.rand(bsz, generator=generator) < 0.5
    own = torch.arange(bsz)
    single = u < 2.0 / 3.0
    left = torch.where(single, torch.where(side, own, draws[:, 0]), draws[:, 0])
    right = torch.where(single, torch.where(side, draws[:, 0], own), draws[:, 1])
    label = torch.where(single, torch.where(side, 0, 1), 2)
    return left, right, label


class TextAssignmentModel(BackboneTask):
    """The TA pre-step (ALBEF/TCL, paired encoder): ``ta_head`` over the fused [CLS] of a caption and two images."""

    def __init__(self, backbone: nn.Module, pair_mode: str) -> None:
        super().__init__(backbone)
        self.pair_mode = pair_mode

    def forward(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        bb = self.backbone
        images = batch["image"]
        embeds, feat = bb.encode_image(images)
        with torch.no_grad():
            sim = feat @ feat.T / bb.temperature()
        left, right, labels = ta_assignments(sim, generator)
        dev = embeds.device
        left, right, labels = left.to(dev), right.to(dev), labels.to(dev)
        tokens = bb.tokenize(batch["text"])
        fused = bb.fuse([embeds[left], embeds[right]], tokens, pair_mode=self.pair_mode)
        logits = getattr(bb, TA_HEAD)(fused[:, 0]).float()
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(1) == labels).float().mean().detach()
        return {"loss": loss, "losses": {"ta": loss.detach()}, "stats": {"train_acc": acc}, "logits": logits,
                "labels": labels}  # fmt: skip


# ============================================================================ evaluation
class _EvalPairs(Dataset):
    def __init__(self, rows: Sequence[PairRow], indices: Sequence[int], store: ImageStore, transform: Any) -> None:
        self.rows, self.indices, self.store, self.transform = rows, list(indices), store, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, str]:
        i = self.indices[k]
        row = self.rows[i]
        try:
            pair = torch.stack([self.transform(self.store.open(row.left)), self.transform(self.store.open(row.right))])
            return i, pair, ""
        except ImageError as exc:
            return i, None, str(exc)


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> dict[str, Any]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    return {"index": [i for i, _ in ok], "image": torch.stack([x for _, x in ok]) if ok else None,
            "failed": [(i, e) for i, x, e in items if x is None]}  # fmt: skip


def nlvr2_metrics(rows: Sequence[PairRow], predictions: dict[int, int]) -> dict[str, Any]:
    """Accuracy and the official consistency (percent) of ``predictions`` (row index -> 0/1) on ``rows``.

    Consistency: over unique sentences (:func:`consistency_key`) with at least one predicted pair, the share whose
    predicted pairs are all correct. Rows without a prediction (unreadable images) are counted in
    ``skipped_pairs`` and left out of both.
    """
    correct = {i: int(p == rows[i].label) for i, p in predictions.items()}
    groups: dict[str, bool] = {}
    for i, ok in correct.items():
        key = consistency_key(rows[i].identifier)
        groups[key] = groups.get(key, True) and bool(ok)
    n = len(correct)
    true_share = sum(r.label for r in rows) / max(1, len(rows))
    return {
        "accuracy": 100.0 * sum(correct.values()) / max(1, n),
        "consistency": 100.0 * sum(groups.values()) / max(1, len(groups)),
        "chance": 100.0 * max(true_share, 1.0 - true_share),
        "num_pairs": n,
        "num_sentences": len(groups),
        "skipped_pairs": len(rows) - n,
    }


def metric_table(results: dict[str, dict[str, Any]], cols: Sequence[str]) -> str:
    """A fixed-width table of ``cols`` per split (missing values as ``-``)."""
    lines = ["split".ljust(12) + "".join(c.rjust(16) for c in cols)]
    for name, m in results.items():
        vals = [f"{m[c]:16.2f}" if isinstance(m.get(c), (int, float)) else "-".rjust(16) for c in cols]
        lines.append(name.ljust(12) + "".join(vals))
    return "\n".join(lines)


# ============================================================================ the task
@register("nlvr2", Nlvr2Options)
class Nlvr2Task:
    """NLVR2 fine-tuning (or the TA pre-step) and evaluation for the shared engine (see the module docstring)."""

    # model.init may be a TA or NLVR2 run: heads, a paired encoder (extra fusion layers) and no pretraining twins;
    # :meth:`prepare` reloads such weights after the surgery, shape-checked
    init_optional_keys = (f"{HEAD}.", f"{TA_HEAD}.", "momentum.", "queues.", "text_encoder.encoder.layer.")

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.opts, self.rank, self.world = cfg, cfg.task, rank, world
        self.store = ImageStore(self.opts.image_root or ".")
        d = cfg.data
        self.eval_tf = eval_transform(d.image_size, d.mean, d.std)
        self._rows: dict[str, list[PairRow]] = {}
        self.predictions: dict[str, dict[int, int]] = {}

    @property
    def pair_mode(self) -> str:
        return "concat" if self.opts.pairing == "concat" else "alternate"

    def json_of(self, split: str) -> str | None:
        return {"train": self.opts.train_json, "val": self.opts.val_json, "test": self.opts.test_json}[split]

    def rows(self, split: str) -> list[PairRow]:
        if split not in self._rows:
            path = self.json_of(split)
            if not path:
                raise ConfigError(f"task.{split}_json: not set, cannot use split {split!r}")
            o = self.opts
            self._rows[split], _ = read_nlvr2(path, split, o.max_words, pairs=o.synthetic_pairs,
                                              statements=o.synthetic_statements, seed=o.synthetic_seed)  # fmt: skip
        return self._rows[split]

    # -- model ----------------------------------------------------------------------------------------------------
    def prepare(self, backbone: nn.Module) -> nn.Module:
        """Give ``backbone`` its NLVR2 shape once: paired encoder (ALBEF/TCL ``pairing: paired``), head(s), ViLT's
        third token type; then load ``model.init`` again if it holds weights of that shape (a TA or NLVR2 run)."""
        if getattr(backbone, "nlvr2_prepared", False):
            return backbone
        from pretrain.export import load_state
        from pretrain.models.fusion import is_paired_state, pair_fusion_layers

        kind = model_kind(backbone)
        init = self.cfg.model.init
        state = load_state(init) if init not in (None, "", "none") else {}
        if state and all(k.startswith("backbone.") for k in state):
            state = {k[len("backbone.") :]: v for k, v in state.items()}
        if kind == "fusion":
            unpaired = len(backbone.text_encoder.encoder.layer)
            if self.opts.pairing == "paired":
                pair_fusion_layers(backbone.text_encoder)
            elif is_paired_state(state, "text_encoder.", unpaired):
                raise ConfigError(f"model.init: {init} holds a paired encoder; set task.pairing: paired")
            # the pretraining twins and queues are not used by NLVR2 (it builds its own teacher): free them
            for name in ("momentum", "queues"):
                if hasattr(backbone, name):
                    delattr(backbone, name)
            if self.opts.stage == "ta":
                h = backbone.text_encoder.config.hidden_size
                backbone.add_module(TA_HEAD, nn.Linear(h, 3))
        if self.opts.stage == "nlvr":
            backbone.add_module(HEAD, build_head(backbone))
            if kind == "single":
                backbone.init_second_image_type()
        reshaped = any(k.startswith((f"{HEAD}.", f"{TA_HEAD}.")) for k in state) or (
            kind == "fusion" and is_paired_state(state, "text_encoder.", unpaired))  # fmt: skip
        if reshaped:
            own = backbone.state_dict()
            use = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
            with torch.no_grad():
                backbone.load_state_dict(use, strict=False)
            log.info("model.init %s: %d weights loaded into the NLVR2-shaped model", init, len(use))
        backbone.nlvr2_prepared = True
        return backbone

    def build_model(self, backbone: nn.Module) -> nn.Module:
        self.prepare(backbone)
        if self.opts.stage == "ta":
            return TextAssignmentModel(backbone, self.pair_mode)
        o = self.opts
        return Nlvr2Model(backbone, self.pair_mode, distill=o.distill, alpha=o.alpha, momentum=o.momentum)

    def _train_tf(self) -> Any:
        d = self.cfg.data
        if d.transform == "none":
            return eval_transform(d.image_size, d.mean, d.std)
        # a horizontal flip inside one image is safe: in NLVR2 "left"/"right" name the image slots
        return train_transform(d.image_size, tuple(d.crop_scale), d.randaugment, d.mean, d.std,
                               flip=d.transform != "clip")  # fmt: skip

    def train_loader(self) -> Any:
        d = self.cfg.data
        if self.opts.stage == "ta":
            entries, _ = read_annotations(self.opts.train_json, "train", self.opts.max_words)
            return CaptionLoader(entries, self.store, self._train_tf(), batch_size=d.batch_size, seed=self.cfg.run.seed,
                                 rank=self.rank, world_size=self.world, num_workers=d.num_workers)  # fmt: skip
        return PairLoader(self.rows("train"), self.store, self._train_tf(), batch_size=d.batch_size,
                          seed=self.cfg.run.seed, rank=self.rank, world=self.world, num_workers=d.num_workers,
                          swap_prob=self.opts.swap_prob)  # fmt: skip

    # -- evaluation -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        # the eval DataLoader draws its base seed from the global RNG: fork it, so a run that evaluates mid-way
        # trains on exactly as a run resumed from the checkpoint written at that step
        with torch.random.fork_rng(devices=[]):
            return self._evaluate(backbone, split)

    def _evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        self.prepare(backbone)
        was = backbone.training
        backbone.eval()
        try:
            if self.opts.stage == "ta":
                return self._evaluate_ta(backbone, split)
            rows = self.rows(split)
            mine = list(range(self.rank, len(rows), self.world))
            loader = DataLoader(_EvalPairs(rows, mine, self.store, self.eval_tf), batch_size=self.cfg.eval.batch_size,
                                num_workers=self.cfg.eval.num_workers, collate_fn=_collate)  # fmt: skip
            preds: dict[int, int] = {}
            device = next(backbone.parameters()).device
            for batch in loader:
                for i, err in batch["failed"]:
                    log.warning("%s: pair %s skipped: %s", split, rows[i].identifier, err)
                if batch["image"] is None:
                    continue
                texts = [rows[i].sentence for i in batch["index"]]
                logits = pair_logits(backbone, batch["image"].to(device), texts, self.pair_mode)
                preds.update(zip(batch["index"], logits.argmax(1).tolist()))
        finally:
            backbone.train(was)
        for part in gather_objects(preds, self.world):
            preds.update(part)
        self.predictions[split] = preds
        return nlvr2_metrics(rows, preds)

    def _evaluate_ta(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        """TA accuracy on ``split``'s captions (first caption per image), batches of ``eval.batch_size`` images
        with a fixed generator: the same draws at every evaluation."""
        from finetune.data import eval_image_batches

        entries, _ = read_annotations(self.json_of(split), split, self.opts.max_words)
        model = TextAssignmentModel(backbone, self.pair_mode)
        gen = torch.Generator().manual_seed(1234)
        correct = total = 0
        device = next(backbone.parameters()).device
        for b, batch in enumerate(eval_image_batches([e.image for e in entries], self.store, self.eval_tf,
                                                     self.cfg.eval.batch_size, self.cfg.eval.num_workers)):  # fmt: skip
            if batch["image"] is None or len(batch["index"]) < 3 or b % self.world != self.rank:
                continue
            texts = [entries[i].captions[0] for i in batch["index"]]
            out = model({"image": batch["image"].to(device), "text": texts}, generator=gen)
            correct += int((out["logits"].argmax(1) == out["labels"]).sum())
            total += len(texts)
        counts = gather_objects((correct, total), self.world)
        c, t = sum(x for x, _ in counts), sum(y for _, y in counts)
        return {"ta_accuracy": 100.0 * c / max(1, t), "num_captions": t, "chance": 100.0 / 3.0}

    def table(self, results: dict[str, dict[str, Any]]) -> str:
        """The printed summary: accuracy, consistency and chance per evaluated split."""
        cols = ("ta_accuracy", "chance") if self.opts.stage == "ta" else ("accuracy", "consistency", "chance")
        return metric_table(results, cols)

    def report(self, metrics: dict[str, Any], split: str, out_dir: str | Path) -> list[Path]:
        """The official predictions CSV (``identifier,label``) of the evaluated split."""
        preds = self.predictions.get(split)  # "val_best" holds the kept checkpoint's numbers, not its predictions
        if not preds or self.opts.stage == "ta":
            return []
        rows = self.rows(split)
        path = Path(out_dir) / f"nlvr2_{split}_predictions.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            for i in sorted(preds):
                writer.writerow([rows[i].identifier, "True" if preds[i] else "False"])
        return [path]
