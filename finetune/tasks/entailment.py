"""SNLI-VE visual entailment for CLIP, ViLT, ALBEF and TCL (task ``entailment``).

Data (:func:`read_ve`, format detected from the file):

* the official ``snli_ve_{train,dev,test}.jsonl`` (one SNLI row per line): the image id key is ``Flikr30kID``
  (older, widely used files; value with ".jpg") or ``Flickr30K_ID`` (the current generator; without) -- both are
  accepted and the image is ``<id>.jpg``; the hypothesis is ``sentence2``; the label ``gold_label``. The caption
  premise ``sentence1`` is never read (it would leak the answer through text-only inference). Rows whose
  ``gold_label`` is not one of the three labels (SNLI's "-") are reported and skipped;
* ALBEF's ``ve_{train,dev,test}.json``: a list of ``{image: "<flickr id>" (".jpg" appended when it has no
  extension), sentence, label}``;
* the synthetic set's ``{split}_scenes.jsonl``: hypotheses derived per image by
  :func:`data_prep.sources.synthetic.entailment` (seeded by ``task.synthetic_seed``, split and image id).

Labels are numbered as ALBEF does: contradiction 0, neutral 1, entailment 2. The head is a 3-way MLP on the pair
features (:mod:`finetune.pairs`): ALBEF's ``cls_head`` (Linear-ReLU-Linear) on the fused [CLS] for ALBEF/TCL, with
momentum distillation (``(1 - alpha) * CE + alpha * soft CE`` against the momentum model, alpha = 0.4 constant as in
ALBEF's VE recipe); ViLT's MLP on its pooled [CLS] (ViLT published no VE head; this is its VQA head's shape); and a
late-fusion MLP for CLIP (a baseline).

Metrics per split: ``acc`` (percent), ``acc_<label>`` (recall per true class), the confusion matrix as
``conf_<true>_<pred>`` counts, and two baselines computed from the training labels: ``majority_acc`` (always the
most frequent label) and ``hyp_majority_acc`` (a hypothesis-only model: the most frequent training label of the same
hypothesis text, else the overall majority). Chance is 33.33.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_prep.transforms import pre_caption
from finetune.data import scene_rows, usable_rows
from finetune.distill import Distiller, distilled_ce, has_momentum_encoders
from finetune.pairs import (
    HeadTask,
    ItemLoader,
    MLPHead,
    example_picks,
    feature_dim,
    head_style,
    load_head_init,
    pair_features,
    predict_items,
    results_table,
    spaced,
    write_examples,
)
from finetune.task_module import BackboneTask
from finetune.tasks import TaskOptions, register
from launch.config import ConfigError, exists_field

log = logging.getLogger("vlp.finetune.entailment")

HEAD = "ve_head"
LABELS: tuple[str, ...] = ("contradiction", "neutral", "entailment")  # ALBEF's ids 0, 1, 2
IMAGE_KEYS = ("Flikr30kID", "Flickr30K_ID")  # sic: the widely distributed files misspell it


@dataclasses.dataclass
class EntailmentOptions(TaskOptions):
    name: str = "entailment"
    train_json: str | None = exists_field(None)
    val_json: str | None = exists_field(None)
    test_json: str | None = exists_field(None)
    image_root: str | None = exists_field(None)
    max_words: int = 30
    distill: bool = True  # ALBEF/TCL: momentum distillation
    alpha: float = 0.4
    alpha_warmup: bool = False  # ALBEF's VE recipe: alpha constant from the first step
    head_lr_mult: float = 1.0
    synthetic_seed: int = 0
    eval_limit: int = 0  # evaluate this many evenly spaced items of val/test (0: all; quick CPU runs)

    def validate(self, recipe: Any) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("task.alpha: must be in [0, 1]")
        if self.head_lr_mult <= 0:
            raise ConfigError("task.head_lr_mult: must be > 0")
        if not (self.val_json or self.test_json):
            raise ConfigError("task.val_json / task.test_json: at least one evaluation split is required")


@dataclasses.dataclass
class VeItem:
    image: str
    hypothesis: str
    label: int


def _image_name(value: str) -> str:
    value = value.strip()
    return value if Path(value).suffix else value + ".jpg"


def _label(raw: Any) -> int | None:
    return LABELS.index(raw) if raw in LABELS else None


def _read_snli_ve(path: Path, lines: list[str], max_words: int, problems: list[str]) -> list[VeItem]:
    items = []
    for row, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path}: line {row + 1}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not JSON ({exc}); skipped")
            continue
        key = next((k for k in IMAGE_KEYS if isinstance(rec, dict) and isinstance(rec.get(k), str)), None)
        if key is None:
            problems.append(f"{where}: no image id ({' or '.join(IMAGE_KEYS)}); skipped")
            continue
        label = _label(rec.get("gold_label"))
        if label is None:
            problems.append(f"{where}: gold_label {rec.get('gold_label')!r} is not one of {LABELS}; skipped")
            continue
        hypothesis = pre_caption(rec["sentence2"], max_words) if isinstance(rec.get("sentence2"), str) else ""
        if not hypothesis:
            problems.append(f"{where}: no usable sentence2 (hypothesis); skipped")
            continue
        image = _image_name(rec[key].removesuffix(".jpg"))
        items.append(VeItem(image, hypothesis, label))
    return items


def _read_albef(path: Path, rows: list, max_words: int, problems: list[str]) -> list[VeItem]:
    items = []
    for row, r in enumerate(rows):
        where = f"{path}: row {row}"
        if not isinstance(r, dict) or not isinstance(r.get("image"), str) or not r["image"]:
            problems.append(f"{where}: not an object with an 'image' string; skipped")
            continue
        label = _label(r.get("label"))
        if label is None:
            problems.append(f"{where}: label {r.get('label')!r} is not one of {LABELS}; skipped")
            continue
        hypothesis = pre_caption(r["sentence"], max_words) if isinstance(r.get("sentence"), str) else ""
        if not hypothesis:
            problems.append(f"{where}: no usable 'sentence'; skipped")
            continue
        items.append(VeItem(_image_name(r["image"]), hypothesis, label))
    return items


def _read_synthetic(path: Path, lines: list[str], split: str, seed: int, max_words: int,
                    problems: list[str]) -> list[VeItem]:  # fmt: skip
    from data_prep.sources.synthetic import entailment

    items = []
    for scene, image, image_id in scene_rows(path, lines, problems):
        rng = random.Random(f"entailment/{seed}/{split}/{image_id}")
        for hypothesis, label in entailment(scene, rng):
            items.append(VeItem(image, pre_caption(hypothesis, max_words), LABELS.index(label)))
    return items


def read_ve(path: str | Path, split: str, *, max_words: int = 30, seed: int = 0) -> tuple[list[VeItem], list[str]]:
    """(items, problems) of an SNLI-VE file in any supported format (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"SNLI-VE file not found: {p}")
    text = p.read_text(encoding="utf-8")
    problems: list[str] = []
    if p.suffix == ".jsonl":
        lines = text.splitlines()
        first = next((json.loads(x) for x in lines if x.strip()), {})
        if isinstance(first, dict) and "scene" in first:
            items = _read_synthetic(p, lines, split, seed, max_words, problems)
        else:
            items = _read_snli_ve(p, lines, max_words, problems)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from exc
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a list of {{image, sentence, label}} rows (ALBEF's ve_*.json)")
        items = _read_albef(p, data, max_words, problems)
    return usable_rows(p, items, problems, "example", log)


# ============================================================================ training module
class EntailmentModel(BackboneTask):
    """The backbone (carrying ``ve_head``) and, for ALBEF/TCL, the momentum teacher."""

    def __init__(self, backbone: nn.Module, opts: EntailmentOptions) -> None:
        distiller = None
        if opts.distill and has_momentum_encoders(backbone):
            distiller = Distiller(backbone, [HEAD], momentum=backbone.opts.momentum, alpha=opts.alpha,
                                  warmup=opts.alpha_warmup)  # fmt: skip
        super().__init__(backbone, distiller)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        bb = self.backbone
        alpha = self.distill_alpha(batch)
        logits = getattr(bb, HEAD)(pair_features(bb, batch["image"], batch["text"]))
        teacher = None
        if self.distiller is not None and alpha > 0:
            with torch.no_grad():
                teacher = self.distiller.twin(HEAD)(pair_features(bb, batch["image"], batch["text"], momentum=True))
        loss = distilled_ce(logits, batch["label"], teacher, alpha)
        return {"loss": loss, "losses": {"ve": loss.detach()}, "alpha": alpha}


def attach_head(backbone: nn.Module) -> None:
    setattr(backbone, HEAD, MLPHead(feature_dim(backbone), len(LABELS), head_style(backbone)))


# ============================================================================ the task
@register("entailment", EntailmentOptions)
class EntailmentTask(HeadTask):
    """SNLI-VE fine-tuning and evaluation for the shared engine (see the module docstring)."""

    head_name = HEAD
    init_optional_keys = (HEAD + ".",)  # the head may be absent from model.init (a pretrain run)

    def items(self, split: str) -> list[VeItem]:
        if split not in self._items:
            path = self.json_of(split)
            if not path:
                raise ConfigError(f"task.{split}_json: not set, cannot use split {split!r}")
            items = read_ve(path, split, max_words=self.opts.max_words, seed=self.opts.synthetic_seed)[0]
            self._items[split] = items if split == "train" else spaced(items, self.opts.eval_limit)
        return self._items[split]

    def build_model(self, backbone: nn.Module) -> EntailmentModel:
        attach_head(backbone)
        return EntailmentModel(backbone, self.opts)

    def train_loader(self) -> ItemLoader:
        items = self.items("train")
        labels = torch.tensor([it.label for it in items], dtype=torch.long)

        def extra(indices: list[int]) -> dict[str, Any]:
            return {"text": [items[i].hypothesis for i in indices], "label": labels[indices]}

        d = self.cfg.data
        return ItemLoader([it.image for it in items], self.store, self.train_transform(), extra,
                          batch_size=d.batch_size, seed=self.cfg.run.seed, rank=self.rank, world=self.world,
                          num_workers=d.num_workers)  # fmt: skip

    def baselines(self) -> tuple[int, dict[str, int]] | None:
        """(the majority training label, the majority label per training hypothesis)."""
        if not self.opts.train_json:
            return None
        train = self.items("train")
        overall = Counter(it.label for it in train)
        per_text: dict[str, Counter] = defaultdict(Counter)
        for it in train:
            per_text[it.hypothesis][it.label] += 1

        def top(c: Counter) -> int:
            return min(c, key=lambda k: (-c[k], k))

        return top(overall), {t: top(c) for t, c in per_text.items()}

    def ensure_head(self, backbone: nn.Module) -> None:
        if getattr(backbone, HEAD, None) is not None:
            return
        attach_head(backbone)
        if load_head_init(backbone, HEAD, self.cfg.model.init) is False and self.rank == 0:
            log.warning("model.init has no %s weights: evaluating an untrained head", HEAD)
        getattr(backbone, HEAD).to(next(backbone.parameters()).device)

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        items = self.items(split)
        self.ensure_head(backbone)
        head = getattr(backbone, HEAD)
        device = next(backbone.parameters()).device

        def predict(images: torch.Tensor, texts: list[str]) -> list[int]:
            return head(pair_features(backbone, images.to(device), texts)).argmax(dim=1).tolist()

        was = backbone.training
        backbone.eval()
        try:
            preds, problems = predict_items(
                [it.image for it in items], [it.hypothesis for it in items], self.store, self.eval_tf, predict,
                batch_size=self.cfg.eval.batch_size, num_workers=self.cfg.eval.num_workers, rank=self.rank,
                world=self.world,
            )  # fmt: skip
        finally:
            backbone.train(was)
        metrics = entailment_metrics([it.label for it in items], preds)
        metrics["skipped_images"] = len(problems)
        base = self.baselines()
        if base is not None:
            majority, per_text = base
            metrics["majority_acc"] = 100.0 * sum(it.label == majority for it in items) / len(items)
            hyp = [per_text.get(it.hypothesis, majority) for it in items]
            metrics["hyp_majority_acc"] = 100.0 * sum(it.label == h for it, h in zip(items, hyp)) / len(items)
        self.extras[split] = {"items": items, "preds": preds}
        return metrics

    def report(self, metrics: dict[str, Any], split: str, out_dir: str | Path) -> list[Path]:
        extras = self.extras.get(split)
        if not extras:
            return []
        items, preds = extras["items"], extras["preds"]
        n = int(self.cfg.eval.qualitative)
        picks = example_picks(len(items), n)
        rows = [{"image": items[i].image, "ok": preds[i] == items[i].label,
                 "lines": [items[i].hypothesis, f"predicted: {LABELS[preds[i]] if preds[i] is not None else '-'}",
                           f"label: {LABELS[items[i].label]}"]} for i in picks]  # fmt: skip
        png = write_examples(Path(out_dir) / f"ve_{split}_examples.png", rows, self.store)
        return [png] if png else []

    def table(self, results: dict[str, dict[str, Any]]) -> str:
        cols = ["acc"] + [f"acc_{lab}" for lab in LABELS] + ["majority_acc", "hyp_majority_acc"]
        return results_table(results, cols)


def entailment_metrics(labels: list[int], preds: list[int | None]) -> dict[str, Any]:
    """Accuracy, per-class accuracy and the confusion counts ``conf_<true>_<pred>`` (a failed image, ``None``,
    counts as wrong and appears in no confusion cell)."""
    n = len(labels)
    conf = [[0] * len(LABELS) for _ in LABELS]
    for y, p in zip(labels, preds):
        if p is not None:
            conf[y][p] += 1
    out: dict[str, Any] = {"acc": 100.0 * sum(conf[k][k] for k in range(len(LABELS))) / max(1, n), "num_examples": n}
    for k, name in enumerate(LABELS):
        total = sum(1 for y in labels if y == k)
        out[f"acc_{name}"] = 100.0 * conf[k][k] / total if total else 0.0
        for j, other in enumerate(LABELS):
            out[f"conf_{name}_{other}"] = conf[k][j]
    return out
