"""Weakly-supervised referring-expression grounding (RefCOCO+ protocol) for all four models.

Training uses (expression, image) pairs only, no boxes: image-id-aware ITC (+ ITM with hard negatives for ALBEF/TCL,
ITM for ViLT; ALBEF/TCL's ITC distilled from the momentum encoders, ``task.distill``) exactly as retrieval fine-tuning
(:class:`finetune.tasks.retrieval.RetrievalModel`), on a square resize
without crop or flip, so that a heat map over the patch grid maps back onto the image.

Localisation, per expression, over its image's proposals (gold boxes or detections):

* ALBEF / TCL: Grad-CAM of the ITM positive-class logit on the cross-attention of fusion layer
  ``task.gradcam_layer`` (default: the third fusion layer, ALBEF's "layer 8"; the last one when there are fewer);
* ViLT (a project design, not from the ViLT paper): Grad-CAM of its ITM logit on the text-query x image-key block of
  the self-attention of layer ``task.vilt_layer`` (default: the middle layer);
* then (:mod:`finetune.boxes`): the map upsampled to the image's size, each proposal scored by the map's mass in
  the box / sqrt(area), the best proposal (reset per expression) is a hit iff IoU >= 0.5;
* CLIP (ReCLIP's baseline, no map): each proposal scored by CLIP on the **crop** of the box and on the image
  **blurred** everywhere but the box, the two logits summed; the heat map of the report is the score-weighted boxes.

Data (``task.dataset``):

* ``refcoco``: ``task.instances`` (COCO ``instances.json``) + ``task.refs`` (the JSON written by
  ``python -m data_prep convert-refs``; training never unpickles). Ground truth = the referred annotation's bbox.
  Proposals (``task.proposals``): ``gold`` (every annotation box of the image) or ``dets`` (``task.dets``: MAttNet's
  flat list ``[{image_id, box: [x, y, w, h], ...}]`` or ALBEF's ``dets.json`` dict ``{str(image_id): [[x, y, w, h],
  ...]}``). Splits: train; val; test = testA + testB (each also reported alone).
* ``synthetic``: ``task.root`` = the synthetic set (``{split}_scenes.jsonl`` + shards); every object gets its
  expression (:func:`data_prep.sources.synthetic.referring_expressions`); gold proposals = all object boxes of the
  scene.

Metrics: ``accuracy`` (percent of expressions), ``accuracy_<split>`` for testA/testB, ``random_baseline`` (the
expected accuracy of a uniformly random proposal: the mean share of proposals with IoU >= 0.5), ``num_expressions``,
``skipped_images``, ``mean_proposals``. ``report`` writes ``grounding_<split>.png``: per expression, the image with
the predicted (red; green when a hit) and true (blue) boxes, the heat map, and the expression.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import nn

from data_prep.transforms import eval_transform, pre_caption
from finetune.boxes import best_box, box_scores, gradcam_map, iou, normalized_to_pixels, upsample_map
from finetune.data import CaptionLoader, Entry, ImageError, ImageStore, scene_rows
from finetune.pairs import gather_objects
from finetune.tasks import TaskOptions, register
from finetune.tasks.retrieval import RetrievalModel, model_kind
from launch.config import ConfigError, exists_field
from pretrain.models.encoders import token_grid

log = logging.getLogger("vlp.finetune.grounding")

HIT_IOU = 0.5


@dataclasses.dataclass
class GroundingOptions(TaskOptions):
    name: str = "grounding"
    dataset: Literal["synthetic", "refcoco"] = "synthetic"
    root: str | None = exists_field(None)  # synthetic: the set's out.dir; refcoco: the COCO train2014 image folder
    instances: str | None = exists_field(None)  # refcoco: instances.json
    refs: str | None = exists_field(None)  # refcoco: refs JSON from `python -m data_prep convert-refs`
    proposals: Literal["gold", "dets"] = "gold"
    dets: str | None = exists_field(None)  # refcoco + proposals=dets: MAttNet list or ALBEF dict json
    max_words: int = 30
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    distill: bool = True  # ALBEF/TCL: ITC targets mixed with the momentum model's (as retrieval fine-tuning)
    alpha: float = 0.4
    alpha_warmup: bool = True
    gradcam_layer: int | None = None  # ALBEF/TCL fusion layer index; None: fusion_layer + 2 (clamped)
    vilt_layer: int | None = None  # ViLT block; None: the middle one
    box_alpha: float = 0.5  # score = mass / area**box_alpha
    clip_prompt: str = "{}"  # CLIP text for an expression (ReCLIP: "a photo of {}")
    clip_blur: float = 0.15  # CLIP blur radius as a fraction of the longer image side (ReCLIP: 100 px)
    max_eval: int = 0  # first N expressions per split only (0: all)

    def validate(self, recipe: Any) -> None:
        if not self.root:
            raise ConfigError("task.root: required (synthetic set folder, or the COCO image folder)")
        if self.dataset == "refcoco" and not (self.instances and self.refs):
            raise ConfigError("task.instances / task.refs: refcoco needs instances.json and the converted refs JSON")
        if self.proposals == "dets" and not self.dets:
            raise ConfigError("task.dets: proposals=dets needs the detections file")
        if self.proposals == "dets" and self.dataset == "synthetic":
            raise ConfigError("task.proposals: the synthetic set has gold proposals only")
        if "{}" not in self.clip_prompt:
            raise ConfigError("task.clip_prompt: must contain {} (where the expression goes)")
        if self.itc_weight < 0 or self.itm_weight < 0 or self.box_alpha < 0 or self.clip_blur <= 0:
            raise ConfigError("task.itc_weight / itm_weight / box_alpha >= 0 and task.clip_blur > 0")
        if hasattr(recipe, "eval"):
            self._check_recipe(recipe)

    def _check_recipe(self, cfg: Any) -> None:
        if cfg.eval.metric != "accuracy":
            raise ConfigError(f"eval.metric: grounding reports 'accuracy', got {cfg.eval.metric!r}")
        if cfg.mixgen.enabled:
            raise ConfigError("mixgen.enabled: MixGen is a pretraining augmentation; grounding runs without it")


# ============================================================================ data
@dataclasses.dataclass
class RefRow:
    """One expression: its image, ground-truth box and proposals (``[x, y, w, h]``; normalized when ``relative``)."""

    image: str
    image_id: Any
    expression: str
    box: list[float]
    proposals: list[list[float]]
    split: str
    relative: bool = False  # synthetic: boxes in [0, 1], scaled by the decoded image's size

    def pixel_boxes(self, width: int, height: int) -> tuple[list[float], list[list[float]]]:
        if not self.relative:
            return self.box, self.proposals

        def scale(b: Sequence[float]) -> list[float]:
            return [b[0] * width, b[1] * height, b[2] * width, b[3] * height]

        return scale(self.box), [scale(p) for p in self.proposals]


def _load_json(path: str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def read_detections(path: str) -> dict[int, list[list[float]]]:
    """Proposals per image id from MAttNet's flat list or ALBEF's ``dets.json`` dict (first 4 numbers of a box)."""
    data = _load_json(path)
    out: dict[int, list[list[float]]] = defaultdict(list)

    def box(value: Any, where: str) -> list[float] | None:
        if isinstance(value, list) and len(value) >= 4 and all(isinstance(v, (int, float)) for v in value[:4]):
            return [float(v) for v in value[:4]]
        log.warning("%s: not a box [x, y, w, h, ...]; skipped", where)
        return None

    if isinstance(data, dict):
        for key, boxes in data.items():
            if not isinstance(boxes, list):
                log.warning("%s[%r]: not a list of boxes; skipped", path, key)
                continue
            for j, b in enumerate(boxes):
                if (bb := box(b, f"{path}[{key!r}][{j}]")) is not None:
                    out[int(key)].append(bb)
    elif isinstance(data, list):
        for j, det in enumerate(data):
            if not isinstance(det, dict) or "image_id" not in det:
                log.warning("%s[%d]: not a detection {image_id, box}; skipped", path, j)
                continue
            if (bb := box(det.get("box"), f"{path}[{j}].box")) is not None:
                out[int(det["image_id"])].append(bb)
    else:
        raise ValueError(f"{path}: expected MAttNet's list of detections or ALBEF's dict of boxes per image id")
    return dict(out)


def read_refcoco(instances: str, refs: str, splits: Sequence[str], *, max_words: int = 30,
                 dets: str | None = None) -> tuple[list[RefRow], list[str]]:  # fmt: skip
    """One row per expression of the refs whose split is in ``splits`` (``testA`` matches ``testA`` only)."""
    inst = _load_json(instances)
    if not isinstance(inst, dict) or not all(isinstance(inst.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"{instances}: a COCO instances file needs 'images' and 'annotations' lists")
    images = {im["id"]: im for im in inst["images"] if isinstance(im, dict) and "id" in im}
    anns = {a["id"]: a for a in inst["annotations"] if isinstance(a, dict) and "id" in a}
    gold: dict[Any, list[list[float]]] = defaultdict(list)
    for a in anns.values():
        if isinstance(a.get("bbox"), list) and len(a["bbox"]) == 4:
            gold[a.get("image_id")].append([float(v) for v in a["bbox"]])
    detected = read_detections(dets) if dets else None
    data = _load_json(refs)
    if not isinstance(data, list):
        raise ValueError(f"{refs}: expected the list written by `python -m data_prep convert-refs`")
    rows, problems = [], []
    for i, ref in enumerate(data):
        where = f"{refs}[{i}]"
        if not isinstance(ref, dict) or ref.get("split") not in splits:
            continue
        ann, image = anns.get(ref.get("ann_id")), images.get(ref.get("image_id"))
        if ann is None or image is None or not isinstance(image.get("file_name"), str):
            problems.append(f"{where}: ann_id {ref.get('ann_id')} / image_id {ref.get('image_id')} not in {instances}")
            continue
        proposals = gold[ref["image_id"]] if detected is None else detected.get(int(ref["image_id"]), [])
        if not proposals:
            problems.append(f"{where}: image {ref['image_id']} has no proposal; skipped")
            continue
        for s in ref.get("sentences") or []:
            text = pre_caption(s.get("sent", ""), max_words) if isinstance(s, dict) else ""
            if not text:
                problems.append(f"{where}: an empty expression; skipped")
                continue
            rows.append(RefRow(image["file_name"], ref["image_id"], text, [float(v) for v in ann["bbox"]],
                               proposals, ref["split"]))  # fmt: skip
    return rows, problems


def read_synthetic(root: str, split: str, max_words: int = 30) -> tuple[list[RefRow], list[str]]:
    """Every object of every scene of ``{split}_scenes.jsonl`` with its referring expression; gold proposals."""
    from data_prep.sources.synthetic import referring_expressions

    path = Path(root) / f"{split}_scenes.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"task.root: no {path.name} in {root} (python -m data_prep synthetic)")
    rows, problems = [], []
    for scene, ref, image_id in scene_rows(path, path.read_text(encoding="utf-8").splitlines(), problems):
        exprs = referring_expressions(scene)
        proposals = [normalized_to_pixels(o.box, 1, 1) for o in scene.objects]
        for text, box in exprs:
            rows.append(RefRow(ref, image_id, pre_caption(text, max_words),
                               normalized_to_pixels(box, 1, 1), proposals, split, relative=True))  # fmt: skip
    return rows, problems


# ============================================================================ localisation
def fusion_gradcam(backbone: nn.Module, images: torch.Tensor, texts: list[str], layer: int) -> torch.Tensor:
    """ALBEF/TCL Grad-CAM maps ``[B, h, w]``: ITM positive logit w.r.t. fusion layer ``layer``'s cross-attention."""
    te = backbone.text_encoder
    tokens = backbone.tokenize(texts)
    te.set_save_attention(True)
    try:
        with torch.enable_grad():
            embeds, _ = backbone.encode_image(images)
            fused = backbone.fuse(embeds, tokens)
            score = backbone.itm_logits(fused)[:, 1].sum()
            attention = te.attention_maps[layer]
            grad = torch.autograd.grad(score, attention)[0]
    finally:
        te.set_save_attention(False)
    prefix = int(getattr(backbone.visual_encoder, "num_prefix_tokens", 1))
    return gradcam_map(attention.detach(), grad, tokens.attention_mask, token_grid(backbone.visual_encoder), prefix)


def vilt_gradcam(backbone: nn.Module, images: torch.Tensor, texts: list[str], layer: int) -> torch.Tensor:
    """ViLT Grad-CAM maps ``[B, h, w]``: ITM positive logit w.r.t. layer ``layer``'s text->image attention."""
    tokens = backbone.tokenize(texts)
    tokens = {k: tokens[k] for k in ("input_ids", "attention_mask")}
    length = tokens["input_ids"].shape[1]
    with torch.enable_grad():
        out = backbone.fuse(images, tokens, output_attentions=True)
        score = backbone.itm_head(out["pooled"])[:, 1].sum()
        attention = out["attentions"][layer]
        grad = torch.autograd.grad(score, attention)[0]
    vit = backbone.transformer
    prefix = int(getattr(vit, "num_prefix_tokens", 1))
    block = (slice(None), slice(None), slice(0, length), slice(length, None))
    return gradcam_map(attention.detach()[block], grad[block], tokens["attention_mask"], token_grid(vit), prefix)


def clip_proposal_scores(backbone: nn.Module, image: Image.Image, boxes: Sequence[Sequence[float]], text: str,
                         transform: Any, blur: float) -> torch.Tensor:  # fmt: skip
    """ReCLIP's baseline: CLIP logit of the crop + logit of the image blurred outside the box, per proposal."""
    radius = blur * max(image.size)
    blurred = image.filter(ImageFilter.GaussianBlur(radius))
    views = []
    for b in boxes:
        x0, y0 = max(0, int(b[0])), max(0, int(b[1]))
        x1, y1 = min(image.width, int(b[0] + b[2])), min(image.height, int(b[1] + b[3]))
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        crop = image.crop((x0, y0, x1, y1))
        context = blurred.copy()
        context.paste(crop, (x0, y0))
        views += [transform(crop), transform(context)]
    device = next(backbone.parameters()).device
    emb = backbone.encode_image(torch.stack(views).to(device))
    txt = backbone.encode_text([text])
    logits = (backbone.scale() * emb @ txt.T).float().view(len(boxes), 2)
    return logits.sum(dim=1).cpu()


# ============================================================================ the task
@register("grounding", GroundingOptions)
class GroundingTask:
    """Weakly-supervised grounding: retrieval-style training, Grad-CAM / crop scoring evaluation (module docstring)."""

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.opts, self.rank, self.world = cfg, cfg.task, rank, world
        self.store = ImageStore(self.opts.root or ".")
        d = cfg.data
        self.tf = eval_transform(d.image_size, d.mean, d.std)  # square resize, no crop: maps map back
        self._rows: dict[str, list[RefRow]] = {}
        self.examples: dict[str, list[dict[str, Any]]] = {}

    def _splits_of(self, split: str) -> tuple[str, ...]:
        if self.opts.dataset == "refcoco" and split == "test":
            return ("testA", "testB")
        return (split,)

    def json_of(self, split: str) -> str | None:
        o = self.opts
        if o.dataset == "refcoco":
            return o.refs
        path = Path(o.root or ".") / f"{split}_scenes.jsonl"
        return str(path) if path.is_file() and path.stat().st_size > 0 else None

    def rows(self, split: str) -> list[RefRow]:
        if split not in self._rows:
            o = self.opts
            if o.dataset == "refcoco":
                dets = o.dets if o.proposals == "dets" else None
                rows, problems = read_refcoco(o.instances, o.refs, self._splits_of(split), max_words=o.max_words,
                                              dets=dets)  # fmt: skip
            else:
                rows, problems = read_synthetic(o.root, split, o.max_words)
            for p in problems:
                log.warning("%s", p)
            if not rows:
                raise ValueError(f"grounding split {split!r}: no usable expression ({problems[:1]})")
            if o.max_eval and split != "train":
                rows = rows[: o.max_eval]
            self._rows[split] = rows
        return self._rows[split]

    def build_model(self, backbone: nn.Module) -> RetrievalModel:
        from finetune.distill import Distiller, has_momentum_encoders

        o, distiller = self.opts, None
        if o.distill and model_kind(backbone) == "fusion" and has_momentum_encoders(backbone):
            distiller = Distiller(backbone, [], momentum=backbone.opts.momentum, alpha=o.alpha, warmup=o.alpha_warmup)
        return RetrievalModel(backbone, o.itc_weight, o.itm_weight, distiller)

    def train_loader(self) -> CaptionLoader:
        by_image: dict[Any, Entry] = {}
        for r in self.rows("train"):
            by_image.setdefault(r.image_id, Entry(r.image, [], r.image_id)).captions.append(r.expression)
        d = self.cfg.data
        return CaptionLoader(list(by_image.values()), self.store, self.tf, batch_size=d.batch_size,
                             seed=self.cfg.run.seed, rank=self.rank, world_size=self.world,
                             num_workers=d.num_workers)  # fmt: skip

    def layer(self, backbone: nn.Module) -> int:
        kind = model_kind(backbone)
        if kind == "fusion":
            te = backbone.text_encoder
            last = len(te.encoder.layer) - 1
            want = self.opts.gradcam_layer if self.opts.gradcam_layer is not None else te.fusion_layer + 2
            if not te.fusion_layer <= want <= last:
                if self.opts.gradcam_layer is not None:
                    raise ConfigError(f"task.gradcam_layer: {want} is not a fusion layer ({te.fusion_layer}..{last})")
                want = last
            return want
        if kind == "single":
            depth = len(backbone.transformer.blocks)
            want = self.opts.vilt_layer if self.opts.vilt_layer is not None else depth // 2
            if not 0 <= want < depth:
                raise ConfigError(f"task.vilt_layer: {want} outside 0..{depth - 1}")
            return want
        return -1

    def _maps(self, backbone: nn.Module, images: list[Image.Image], rows: list[RefRow], layer: int) -> torch.Tensor:
        device = next(backbone.parameters()).device
        x = torch.stack([self.tf(im) for im in images]).to(device)
        texts = [r.expression for r in rows]
        if model_kind(backbone) == "fusion":
            return fusion_gradcam(backbone, x, texts, layer)
        return vilt_gradcam(backbone, x, texts, layer)

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        with torch.random.fork_rng(devices=[]):  # evaluation leaves the training RNG as it was (exact resume)
            return self._evaluate(backbone, split)

    def _evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        rows = self.rows(split)
        mine = list(range(self.rank, len(rows), self.world))
        kind = model_kind(backbone)
        layer = self.layer(backbone)
        keep_examples = set(range(0, len(rows), max(1, len(rows) // max(1, self.cfg.eval.qualitative)))[
            : self.cfg.eval.qualitative])  # fmt: skip
        results, examples, failed = [], [], 0
        was = backbone.training
        backbone.eval()
        try:
            bs = self.cfg.eval.batch_size
            for start in range(0, len(mine), bs):
                chunk, images = [], []
                for i in mine[start : start + bs]:
                    try:
                        images.append(self.store.open(rows[i].image))
                        chunk.append(i)
                    except ImageError as exc:
                        log.warning("%s: expression %d skipped: %s", split, i, exc)
                        failed += 1
                if not chunk:
                    continue
                maps = self._maps(backbone, images, [rows[i] for i in chunk], layer) if kind != "dual" else None
                for k, i in enumerate(chunk):
                    row, image = rows[i], images[k]
                    gt, proposals = row.pixel_boxes(image.width, image.height)
                    if maps is not None:
                        heat = upsample_map(maps[k].cpu(), image.height, image.width)
                        scores = box_scores(heat, proposals, self.opts.box_alpha)
                    else:
                        text = self.opts.clip_prompt.format(row.expression)
                        scores = clip_proposal_scores(backbone, image, proposals, text, self.tf, self.opts.clip_blur)
                        heat = None
                    pick = best_box(scores)
                    ious = [iou(p, gt) for p in proposals]
                    hit = ious[pick] >= HIT_IOU
                    good = sum(v >= HIT_IOU for v in ious) / len(ious)
                    results.append((i, row.split, bool(hit), good, len(proposals)))
                    if i in keep_examples:
                        small = maps[k].cpu() if maps is not None else _box_map(scores, proposals, image)
                        examples.append({"index": i, "image": row.image, "expression": row.expression, "gt": gt,
                                         "pred": proposals[pick], "hit": bool(hit), "map": small.tolist()})  # fmt: skip
        finally:
            backbone.train(was)
        parts = gather_objects((results, examples, failed), self.world)
        results = sorted(r for p in parts for r in p[0])
        self.examples[split] = sorted((e for p in parts for e in p[1]), key=lambda e: e["index"])
        failed = sum(p[2] for p in parts)
        return grounding_metrics(results, failed, layer)

    def table(self, results: dict[str, dict[str, Any]]) -> str:
        """The printed summary: accuracy (overall and per sub-split) and the random-proposal baseline."""
        from finetune.tasks.nlvr2 import metric_table

        subs = sorted({k for m in results.values() for k in m if k.startswith("accuracy_")})
        return metric_table(results, ["accuracy", *subs, "random_baseline"])

    def report(self, metrics: dict[str, Any], split: str, out_dir: str | Path) -> list[Path]:
        examples = self.examples.get(split)
        if not examples:
            return []
        path = write_grounding_grid(Path(out_dir) / f"grounding_{split}.png", examples, self.store)
        return [path] if path else []


def _box_map(scores: torch.Tensor, proposals: Sequence[Sequence[float]], image: Image.Image) -> torch.Tensor:
    """CLIP has no attention map: a coarse map of the softmax-weighted proposal boxes, for the report."""
    side = 32
    heat = torch.zeros(side, side)
    weights = torch.softmax(scores.float(), 0)
    for w, b in zip(weights.tolist(), proposals):
        x0, y0 = int(b[0] / image.width * side), int(b[1] / image.height * side)
        x1, y1 = int((b[0] + b[2]) / image.width * side) + 1, int((b[1] + b[3]) / image.height * side) + 1
        heat[y0:y1, x0:x1] += w
    return heat


def grounding_metrics(results: Sequence[tuple[int, str, bool, float, int]], failed: int, layer: int) -> dict[str, Any]:
    """Accuracy overall and per sub-split, and the random-proposal baseline, from per-expression results
    ``(index, split, hit, share of proposals with IoU >= 0.5, number of proposals)``."""
    n = len(results)
    out: dict[str, Any] = {
        "accuracy": 100.0 * sum(r[2] for r in results) / max(1, n),
        "random_baseline": 100.0 * sum(r[3] for r in results) / max(1, n),
        "num_expressions": n,
        "mean_proposals": sum(r[4] for r in results) / max(1, n),
        "skipped_images": failed,
        "gradcam_layer": layer,
    }
    splits = sorted({r[1] for r in results})
    if len(splits) > 1:
        for s in splits:
            sub = [r for r in results if r[1] == s]
            out[f"accuracy_{s}"] = 100.0 * sum(r[2] for r in sub) / len(sub)
    return out


def write_grounding_grid(path: Path, examples: list[dict[str, Any]], store: ImageStore, size: int = 160) -> Path | None:
    """A PNG: per example, the image with the predicted (green hit / red miss) and true (blue) boxes, the heat map
    over the image, and the expression."""
    label_h, pad = 30, 6
    canvas = Image.new("RGB", (pad + 2 * (size + pad), pad + len(examples) * (size + label_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, ex in enumerate(examples):
        y = pad + r * (size + label_h + pad)
        try:
            img = store.open(ex["image"])
        except ImageError:
            img = Image.new("RGB", (size, size), "lightgray")
        sx, sy = size / img.width, size / img.height
        shown = img.resize((size, size))
        boxed = shown.copy()
        bd = ImageDraw.Draw(boxed)
        for box, colour in ((ex["gt"], "blue"), (ex["pred"], "green" if ex["hit"] else "red")):
            x, yy, w, h = box[:4]
            bd.rectangle([x * sx, yy * sy, (x + w) * sx - 1, (yy + h) * sy - 1], outline=colour, width=2)
        heat = torch.tensor(ex["map"], dtype=torch.float32)
        heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
        mask = Image.fromarray((heat.numpy() * 255).astype("uint8")).resize((size, size), Image.Resampling.BICUBIC)
        overlay = Image.composite(Image.new("RGB", (size, size), (255, 0, 0)), shown, mask)
        canvas.paste(boxed, (pad, y + label_h))
        canvas.paste(Image.blend(shown, overlay, 0.6), (2 * pad + size, y + label_h))
        verdict = "hit" if ex["hit"] else "miss"
        draw.text((pad, y + 4), f"{ex['expression'][:60]}  [{verdict}]", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
