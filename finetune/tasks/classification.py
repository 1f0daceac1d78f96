"""Image classification: fine-tune a pretrained model's timm vision tower with a linear head, per augmentation policy.

The backbone is the model of ``model`` (its ``visual`` / ``visual_encoder`` timm tower, e.g. ``model.vision.name:
resnet18`` or a ViT; ``model.init`` a pretrain run or ``none`` for training from scratch). A linear head is added
to the backbone (as ``cls_head``, so the best-checkpoint keeper saves it with the tower); the rest of the backbone
(text tower, projections) is frozen and unused. Datasets: :mod:`finetune.classification_data`.

``task.augment`` (the STRAD comparison, Jackson et al. 2019):

* ``none``: square resize only;
* ``traditional``: random resized crop, horizontal flip, rotation, colour jitter (brightness, contrast,
  saturation), every draw from the loader's per-sample generator (exact resume);
* ``style``: online style randomization of a fraction ``style_p`` (or ``style_ratio`` "u:a") of each batch inside
  the training step (:class:`data_prep.style.online.OnlineStyleAugment`, z = alpha N(mu, Sigma) + (1-alpha) P(c)),
  seeded by (seed, step, rank);
* ``traditional+style``: both.

Sweep (one command, one results table): ``python -m finetune.tasks.classification --config <recipe> [k=v ...]``
runs ``python -m finetune`` once per entry of ``task.policies`` in ``run.dir/<policy>`` (same seed, same initial
weights) and writes ``run.dir/results.json`` and ``run.dir/results.md`` with top-1 per policy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageEnhance
from torch import nn

from data_prep.transforms import eval_transform, random_resized_crop_box, to_normalized_tensor
from finetune.classification_data import (
    ClassificationSet,
    imagefolder_splits,
    read_imagefolder,
    read_office31,
    read_stl10,
    read_synthetic,
)
from finetune.data import CaptionLoader, Entry, eval_image_batches
from finetune.metrics import accuracy
from finetune.report import markdown_table, text_table
from finetune.tasks import TaskOptions, register
from launch.config import ConfigError, exists_field, exits_on_config_error
from launch.dist import exit_entry
from pretrain.models.encoders import vision_width

log = logging.getLogger("vlp.finetune.classification")

POLICIES = ("none", "traditional", "style", "traditional+style")
HEAD = "cls_head"
VISION_ATTRS = ("visual", "visual_encoder")
_FILL = (128, 128, 128)


@dataclasses.dataclass
class ClassificationOptions(TaskOptions):
    name: str = "classification"
    dataset: Literal["synthetic", "stl10", "office31", "imagefolder"] = "synthetic"
    root: str | None = exists_field(None)  # dataset folder (the synthetic out.dir, stl10_binary/, Office-31, ...)
    train_domains: tuple[str, ...] = ()  # synthetic / office31: domains trained (and validated) on; () = all
    test_domains: tuple[str, ...] = ()  # synthetic / office31: domains tested on; () = all
    # synthetic: test on every split's images of test_domains (none is trained on: the Office-31 pattern, where
    # the whole target domain is the test set), not only the test split's third; needs disjoint domains
    test_whole_domain: bool = False
    max_train: int = 0  # first N training items only (0: all); for smoke runs
    augment: Literal["none", "traditional", "style", "traditional+style"] = "none"
    policies: tuple[str, ...] = POLICIES  # the sweep of ``python -m finetune.tasks.classification``
    freeze_backbone: bool = False  # true: a linear probe (only the head trains)
    label_smoothing: float = 0.0
    # traditional augmentation
    crop_scale: tuple[float, float] = (0.5, 1.0)
    rotation: float = 15.0  # degrees, uniform in [-rotation, rotation]
    jitter: float = 0.4  # brightness / contrast / saturation factors uniform in [1 - jitter, 1 + jitter]
    flip: bool = True
    # style randomization
    style_p: float = 0.5  # probability that an image of the batch is stylized
    style_ratio: str | None = None  # "u:a" unaugmented:augmented (overrides style_p), e.g. "1:1", "16:1"
    style_alpha: float = 0.5  # z = alpha * N(mu, Sigma) + (1 - alpha) * P(c)
    style_checkpoint: str | None = exists_field(None)  # our style network (pretrain style_transfer's output)
    style_embeddings: str | None = exists_field(None)  # or: public embedding stats with random weights (demo only)
    style_use_predictor: bool = True  # false: the mean embedding stands in for P(c) (images < 43 px)
    image_log_every: int = 0  # steps between TensorBoard grids of original / stylized images
    # evaluate on stylized copies of every image (alpha = style_alpha): how much of the label survives the style
    # network, and whether a model has learnt to ignore style (a diagnostic; the test set itself is unchanged)
    eval_stylized: bool = False

    def validate(self, recipe: Any) -> None:
        if not self.root:
            raise ConfigError("task.root: required (the dataset folder)")
        bad = [p for p in self.policies if p not in POLICIES]
        if bad:
            raise ConfigError(f"task.policies: unknown policy {bad[0]!r}; choose from {', '.join(POLICIES)}")
        if not 0.0 <= self.style_p <= 1.0 or not 0.0 <= self.style_alpha <= 1.0:
            raise ConfigError("task.style_p / task.style_alpha: must be in [0, 1]")
        if self.style_ratio is not None:
            from data_prep.style.sampling import parse_ratio

            try:
                parse_ratio(self.style_ratio)
            except ValueError as exc:
                raise ConfigError(f"task.style_ratio: {exc}") from None
        if not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError("task.crop_scale: need 0 < low <= high <= 1")
        if self.dataset == "office31" and not (self.train_domains and self.test_domains):
            raise ConfigError(
                "task.train_domains / task.test_domains: Office-31 needs both (e.g. [amazon, dslr] / [webcam])"
            )
        overlap = set(self.train_domains) & set(self.test_domains)
        if overlap and self.dataset == "office31":
            raise ConfigError(f"task.test_domains: {sorted(overlap)} also in train_domains (no domain shift)")
        if self.test_whole_domain and (self.dataset != "synthetic" or not self.test_domains or overlap
                                       or not self.train_domains):  # fmt: skip
            raise ConfigError(
                "task.test_whole_domain: only for the synthetic set with disjoint, non-empty train_domains and "
                f"test_domains (got {list(self.train_domains)} / {list(self.test_domains)}): otherwise training "
                "images would be tested on"
            )
        evaluation = getattr(recipe, "eval", None)
        if evaluation is not None and evaluation.metric != "top1":
            raise ConfigError(f"eval.metric: classification reports 'top1', got {evaluation.metric!r}")
        self.check_style(self.augment)
        if self.eval_stylized:
            self.check_style("style")

    def uses_style(self, policy: str | None = None) -> bool:
        return "style" in (policy or self.augment)

    def check_style(self, policy: str) -> None:
        if self.uses_style(policy) and not (self.style_checkpoint or self.style_embeddings):
            raise ConfigError(
                "task.style_checkpoint: the style policies need a style network (run.dir/style_checkpoint.safetensors"
                " of `pretrain` style_transfer), or task.style_embeddings for random weights (demo only)"
            )


# ============================================================================ augmentation
class TraditionalTransform:
    """Random resized crop -> flip -> rotation -> colour jitter -> tensor -> normalize; draws from ``generator``."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale: tuple[float, float] = (0.5, 1.0),
        rotation: float = 15.0,
        jitter: float = 0.4,
        flip: bool = True,
    ) -> None:
        self.size, self.mean, self.std = int(image_size), tuple(mean), tuple(std)
        self.crop_scale, self.rotation, self.jitter, self.flip = tuple(crop_scale), rotation, jitter, flip

    def _u(self, gen: torch.Generator | None, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        img = img.convert("RGB") if img.mode != "RGB" else img
        left, top, w, h = random_resized_crop_box(img.width, img.height, self.crop_scale, generator=generator)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        # every draw happens whatever the switches, so the generator advances by a fixed amount per image
        flip = float(torch.rand((), generator=generator)) < 0.5
        angle = self._u(generator, -self.rotation, self.rotation)
        factors = [self._u(generator, 1 - self.jitter, 1 + self.jitter) for _ in range(3)]
        if self.flip and flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.rotation:
            img = img.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_FILL)
        if self.jitter:
            for enhancer, f in zip((ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color), factors):
                img = enhancer(img).enhance(f)
        return to_normalized_tensor(img, self.mean, self.std)


def build_style_augment(
    opts: ClassificationOptions, mean: Sequence[float], std: Sequence[float], every_image: bool = False
) -> Any:
    """The batched online stylizer of the style policies (our checkpoint, or public statistics + random weights);
    ``every_image`` stylizes the whole batch whatever style_p / style_ratio say."""
    from data_prep.style.online import OnlineStyleAugment
    from data_prep.style.stage import ModelSection, build_randomizer

    model = ModelSection(
        checkpoint=opts.style_checkpoint,
        embeddings=opts.style_embeddings,
        random_init=not opts.style_checkpoint,
        use_predictor=opts.style_use_predictor,
    )
    cfg = SimpleNamespace(
        model=model,
        style=SimpleNamespace(seed=0, alpha=opts.style_alpha),
        runtime=SimpleNamespace(precision="auto", chunk=0),
    )
    randomizer, info = build_randomizer(cfg, torch.device("cpu"))
    log.info("style augmentation network: %s", info)
    if every_image:
        return OnlineStyleAugment(randomizer, mean, std, p=1.0, alpha=opts.style_alpha)
    return OnlineStyleAugment(randomizer, mean, std, p=opts.style_p, ratio=opts.style_ratio, alpha=opts.style_alpha)


def _seed(*parts: int | str) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


# ============================================================================ model
def vision_tower(backbone: nn.Module) -> tuple[str, nn.Module]:
    """(attribute name, timm vision tower) of a pretrained model."""
    for attr in VISION_ATTRS:
        tower = getattr(backbone, attr, None)
        if isinstance(tower, nn.Module):
            return attr, tower
    raise ConfigError(
        f"model.name: classification needs a model with a separate timm vision tower ({', '.join(VISION_ATTRS)}); "
        f"{type(backbone).__name__} has none"
    )


class ClassificationModel(nn.Module):
    """The training module: ``backbone`` (vision tower + ``cls_head``), cross-entropy, optional style randomization."""

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        style: Any = None,
        seed: int = 0,
        freeze_backbone: bool = False,
        label_smoothing: float = 0.0,
        image_log_every: int = 0,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        self.backbone = backbone
        attr, tower = vision_tower(backbone)
        width = vision_width(tower)
        if not isinstance(getattr(backbone, HEAD, None), nn.Linear):
            backbone.add_module(HEAD, nn.Linear(width, num_classes))
        for name, p in backbone.named_parameters():
            trainable = name.startswith(HEAD + ".") or (not freeze_backbone and name.startswith(attr + "."))
            p.requires_grad_(trainable)
        # kept out of the module tree: its weights are neither trained nor checkpointed
        self.__dict__["style"] = style
        self.seed, self.label_smoothing, self.image_log_every = int(seed), label_smoothing, int(image_log_every)
        self.mean, self.std = tuple(mean), tuple(std)
        self._images: dict[str, torch.Tensor] | None = None

    def images_to_log(self) -> dict[str, torch.Tensor] | None:
        images, self._images = self._images, None
        return images

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        images = batch["image"]
        labels = batch["label"].to(images.device)
        if self.style is not None:
            step = int(batch.get("step", 0) or 0)
            rank = dist.get_rank() if dist.is_initialized() else 0
            gen = torch.Generator().manual_seed(_seed(self.seed, step, rank))
            if self.style.randomizer.device != images.device:
                self.style.to(images.device)
            styled, mask = self.style.apply(images, gen)
            if self.image_log_every and rank == 0 and (step + 1) % self.image_log_every == 0 and bool(mask.any()):
                m = torch.tensor(self.mean).view(1, 3, 1, 1)
                s = torch.tensor(self.std).view(1, 3, 1, 1)
                idx = mask.nonzero().flatten()[:4]
                self._images = {
                    "original": images[idx].detach().float().cpu() * s + m,
                    "stylized": styled[idx].detach().float().cpu() * s + m,
                }
            images = styled
        logits = classify(self.backbone, images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        top1 = accuracy(logits.detach().argmax(-1), labels)
        return {"loss": loss, "losses": {"ce": loss.detach(), "train_top1": torch.tensor(top1)}}


def classify(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Logits of the backbone's vision tower + ``cls_head``."""
    head = getattr(backbone, HEAD, None)
    if head is None:
        raise ConfigError("the backbone has no classification head: evaluate a fine-tuned run (not --eval-only)")
    return head(vision_tower(backbone)[1](images))


# ============================================================================ loader
class LabelLoader(CaptionLoader):
    """The engine's loader protocol over a :class:`ClassificationSet`, adding ``label`` to each batch.

    A :class:`finetune.data.CaptionLoader` (seeded epoch permutation dealt to ranks, exact resume, per-row
    augmentation generators, unreadable images reported and replaced) with one caption per image: its index.
    """

    def __init__(self, data: ClassificationSet, transform: Any, *, batch_size: int, seed: int, rank: int, world: int,
                 num_workers: int) -> None:  # fmt: skip
        entries = [Entry(image=ref, captions=[str(i)], key=i) for i, ref in enumerate(data.refs)]
        self.labels = torch.tensor(data.labels, dtype=torch.long)
        super().__init__(entries, data.store, transform, batch_size=batch_size, seed=seed, rank=rank,
                         world_size=world, num_workers=num_workers)  # fmt: skip

    def on_batch(self, batch: dict[str, Any]) -> None:
        super().on_batch(batch)
        batch["label"] = self.labels[batch["image_id"]]  # image_id is the item index (keys map to 0..N-1 in order)


# ============================================================================ the task
@register("classification", ClassificationOptions)
class ClassificationTask:
    """Classification fine-tuning and top-1 evaluation for the shared engine (see the module docstring)."""

    init_optional_keys = (HEAD + ".",)  # absent from a pretrain run, present in a fine-tuned best.safetensors

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        self.cfg, self.opts, self.rank, self.world = cfg, cfg.task, rank, world
        d = cfg.data
        self.eval_tf = eval_transform(d.image_size, d.mean, d.std)
        self._sets: dict[str, ClassificationSet] = {}
        self._eval_style: Any = None

    # -- data -------------------------------------------------------------------------------------------------
    def json_of(self, split: str) -> str | None:
        """A description of ``split``'s source when the dataset has that split, else None."""
        o, root = self.opts, Path(self.opts.root or ".")
        if o.dataset == "stl10":
            return str(root / f"{split}_X.bin") if split in ("train", "test") else None
        if o.dataset == "office31":
            doms = {"train": o.train_domains, "test": o.test_domains}.get(split)
            return f"{root}:{'+'.join(doms)}" if doms else None
        if o.dataset == "imagefolder":
            folder = imagefolder_splits(root).get(split)
            return str(folder) if folder else None
        path = root / f"{split}_scenes.jsonl"
        return str(path) if path.is_file() and path.stat().st_size > 0 else None

    def data(self, split: str) -> ClassificationSet:
        if split not in self._sets:
            o = self.opts
            doms = o.test_domains if split == "test" else o.train_domains
            if o.dataset == "stl10":
                ds = read_stl10(o.root, split)
            elif o.dataset == "office31":
                ds = read_office31(o.root, doms)
            elif o.dataset == "imagefolder":
                ds = read_imagefolder(o.root, split)
            elif split == "test" and o.test_whole_domain:
                ds = read_synthetic(o.root, "test", list(doms))
                for other in ("train", "val"):
                    if (Path(o.root) / f"{other}_scenes.jsonl").is_file():
                        ds = ds.extend(read_synthetic(o.root, other, list(doms)))
            else:
                ds = read_synthetic(o.root, split, list(doms) or None)
            if split == "train" and o.max_train:
                ds = ds.subset(range(min(o.max_train, len(ds))))
            if not len(ds):
                raise ConfigError(f"task: split {split!r} of {o.dataset} at {o.root} has no images (domains {doms})")
            self._sets[split] = ds
        return self._sets[split]

    def train_transform(self) -> Any:
        d, o = self.cfg.data, self.opts
        if "traditional" in o.augment:
            return TraditionalTransform(d.image_size, d.mean, d.std, o.crop_scale, o.rotation, o.jitter, o.flip)
        return self.eval_tf

    def _ensure_head(self, backbone: nn.Module, num_classes: int) -> None:
        """``--eval-only`` of a fine-tuned run: attach the head and load its weights from ``model.init``."""
        if isinstance(getattr(backbone, HEAD, None), nn.Linear):
            return
        from finetune.pairs import load_head_init

        _, tower = vision_tower(backbone)
        device = next(backbone.parameters()).device
        backbone.add_module(HEAD, nn.Linear(vision_width(tower), num_classes).to(device))
        if not load_head_init(backbone, HEAD, self.cfg.model.init) and self.rank == 0:
            log.warning("model.init has no %s weights: evaluating an untrained classifier", HEAD)

    def _stylize_for_eval(self, images: torch.Tensor, split: str, first_item: int) -> torch.Tensor:
        # styles drawn from (seed, split, first item of the batch): the same stylized set for every model compared
        if self._eval_style is None:
            self._eval_style = build_style_augment(self.opts, self.cfg.data.mean, self.cfg.data.std, every_image=True)
        gen = torch.Generator().manual_seed(_seed(self.cfg.run.seed, "eval_stylized", split, first_item))
        return self._eval_style(images, generator=gen)

    # -- the task interface -----------------------------------------------------------------------------------
    def build_model(self, backbone: nn.Module) -> ClassificationModel:
        o, d = self.opts, self.cfg.data
        style = build_style_augment(o, d.mean, d.std) if o.uses_style() else None
        return ClassificationModel(
            backbone, len(self.data("train").classes), style=style, seed=self.cfg.run.seed,
            freeze_backbone=o.freeze_backbone, label_smoothing=o.label_smoothing, image_log_every=o.image_log_every,
            mean=d.mean, std=d.std,
        )  # fmt: skip

    def train_loader(self) -> LabelLoader:
        d = self.cfg.data
        return LabelLoader(self.data("train"), self.train_transform(), batch_size=d.batch_size,
                           seed=self.cfg.run.seed, rank=self.rank, world=self.world,
                           num_workers=d.num_workers)  # fmt: skip

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        """Top-1 over ``split`` (overall and per domain); each rank takes every world-th image, counts are summed."""
        ds = self.data(split)
        self._ensure_head(backbone, len(ds.classes))
        doms = sorted(set(ds.domains))
        mine = list(range(self.rank, len(ds), self.world))
        counts = torch.zeros(len(doms) + 1, 3, dtype=torch.float64)  # correct, total, failed (last row: all)
        was = backbone.training
        backbone.eval()
        device = next(backbone.parameters()).device
        dtype = next(backbone.parameters()).dtype
        try:
            for b in eval_image_batches([ds.refs[i] for i in mine], ds.store, self.eval_tf, self.cfg.eval.batch_size,
                                        self.cfg.eval.num_workers):  # fmt: skip
                for i, err in b["failed"]:
                    log.warning("%s: skipped unreadable image: %s", split, err)
                    counts[doms.index(ds.domains[mine[i]]), 2] += 1
                if b["image"] is None:
                    continue
                images = b["image"]
                if self.opts.eval_stylized:
                    images = self._stylize_for_eval(images, split, mine[b["index"][0]])
                pred = classify(backbone, images.to(device, dtype)).argmax(-1).cpu()
                for j, p in zip(b["index"], pred.tolist()):
                    item = mine[j]
                    row = doms.index(ds.domains[item])
                    counts[row, 0] += float(p == ds.labels[item])
                    counts[row, 1] += 1
        finally:
            backbone.train(was)
        if self.world > 1 and dist.is_initialized():
            summed = counts.to(device)  # NCCL reduces device tensors only
            dist.all_reduce(summed)
            counts = summed.cpu()
        counts[-1] = counts[:-1].sum(0)
        out: dict[str, Any] = {
            "top1": 100.0 * counts[-1, 0].item() / max(1.0, counts[-1, 1].item()),
            "num_images": int(counts[-1, 1].item()),
            "failed_images": int(counts[-1, 2].item()),
            "chance": 100.0 / len(ds.classes),
        }
        if len(doms) > 1:
            for k, dom in enumerate(doms):
                out[f"top1_{dom}"] = 100.0 * counts[k, 0].item() / max(1.0, counts[k, 1].item())
        return out

    def table(self, results: dict[str, dict[str, Any]]) -> str:
        return text_table(results, [("top1", "top-1")])

    def report(self, metrics: dict[str, Any], split: str, out_dir: str | Path) -> list[Path]:
        return []


# ============================================================================ the policy sweep
def table(rows: dict[str, dict[str, Any]]) -> str:
    """A markdown table of top-1 per policy and split."""
    splits = sorted({s for r in rows.values() for s in r})
    return markdown_table(rows, [(s, f"{s} top-1") for s in splits], label="policy")


@exits_on_config_error
def sweep(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m finetune`` once per policy of ``task.policies`` and write one results table."""
    import argparse

    from finetune.config import load_finetune_config
    from finetune.run import run_finetune
    from launch.files import atomic_write_bytes, atomic_write_json
    from launch.logging import quiet_libraries, setup_logging

    parser = argparse.ArgumentParser(
        prog="python -m finetune.tasks.classification",
        description="Classification fine-tuning, one run per augmentation policy.",
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_finetune_config(args.config, list(args.overrides))
    recipes = {  # every policy's recipe is validated before the first run starts
        policy: load_finetune_config(args.config, [*args.overrides, f"task.augment={policy}",
                                                   f"run.dir={Path(cfg.run.dir) / policy}"])
        for policy in cfg.task.policies
    }  # fmt: skip
    setup_logging()
    quiet_libraries()
    base = Path(cfg.run.dir)
    rows: dict[str, dict[str, Any]] = {}
    for policy, recipe in recipes.items():
        if run_finetune(recipe) is None:
            print(f"policy {policy}: preempted; rerun the same command to resume", file=sys.stderr)
            return 0
        res = json.loads((base / policy / "results.json").read_text())
        rows[policy] = {split: m.get("top1", math.nan) for split, m in res.get("splits", {}).items()}
    rank = dist.get_rank() if dist.is_initialized() else 0
    text = table(rows)
    if rank == 0:
        summary = {"task": "classification", "dataset": cfg.task.dataset, "model": cfg.model.name,
                   "train_domains": list(cfg.task.train_domains), "test_domains": list(cfg.task.test_domains),
                   "metric": "top1", "policies": rows,
                   "runs": {p: str(base / p) for p in cfg.task.policies}}  # fmt: skip
        atomic_write_json(base / "results.json", summary)
        atomic_write_bytes(base / "results.md", (text + "\n").encode())
        print(text)
        print(f"results: {base / 'results.json'}")
    return 0


if __name__ == "__main__":
    exit_entry(sweep)
