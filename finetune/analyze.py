"""``python -m finetune analyze <run> [<other run>] [key=value ...]``: what a run's embeddings look like.

For a pretraining (or retrieval fine-tuning) run, on an evaluation split (``--split``, default test):

* alignment and uniformity (Wang & Isola 2020): ``E ||f(x) - g(y)||^2`` over matching image-text pairs (lower:
  pairs closer) and ``log E exp(-2 ||u - v||^2)`` over pairs of images, of texts and of both (lower: spread more
  evenly on the sphere);
* the modality gap (Liang et al. 2022): the distance between the centroids of the image and the text embeddings;
* ``projection.png``: the joint 2-D PCA projection of image and text embeddings, a few matching pairs joined;
* fusion models (ALBEF, TCL, ViLT): ``gradcam.png``, Grad-CAM of the ITM match score over the image tokens for a
  few pairs (gradient-weighted token activations, as in ALBEF's visual grounding);
* with a second run: the same for both side by side, and ``rank_changes.png`` / ``rank_changes.json``: the text
  queries whose ground-truth image rank improved and worsened most from the first run to the second, each with
  both runs' top-k galleries (why does an image rank 3rd instead of 1st?).

Everything is written to ``<run>/analysis[_vs_<other>]/`` (PNG + ``analysis.json``) and to TensorBoard under
the same folder. The model is built like fine-tuning builds it: the recipe (``configs/finetune/retrieval_
synthetic.yaml`` by default) with ``model.init=<run>`` inherits the run's model section; the annotation files
default to the ones beside the run's training shards (``task.test_json=...`` overrides).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw, ImageFont

from launch.config import ConfigError, load_config

log = logging.getLogger("vlp.finetune.analyze")

DEFAULT_RECIPE = "configs/finetune/retrieval_synthetic.yaml"
BEST = "best.safetensors"
IMAGE_COLOUR, TEXT_COLOUR = (0, 114, 178), (213, 94, 0)


# ============================================================================ measures (pure functions, tested)
def alignment(img: torch.Tensor, txt: torch.Tensor, txt2img: Sequence[int], alpha: float = 2.0) -> float:
    """Mean ``||img[txt2img[t]] - txt[t]||^alpha`` over every text and its image (normalised embeddings)."""
    pos = img[torch.as_tensor(list(txt2img))]
    return float((pos - txt).norm(dim=1).pow(alpha).mean())


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """``log mean exp(-t ||u - v||^2)`` over distinct pairs of rows of ``x`` (normalised embeddings)."""
    if len(x) < 2:
        return math.nan
    sq = torch.pdist(x.double(), p=2).pow(2)
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(len(sq)))


def modality_gap(img: torch.Tensor, txt: torch.Tensor) -> float:
    """``||mean(img) - mean(txt)||`` of the normalised embeddings (0: the two clouds share a centre)."""
    return float((img.double().mean(0) - txt.double().mean(0)).norm())


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` projected on its two main principal axes (centred); deterministic sign (largest |loading| > 0)."""
    xc = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(xc, full_matrices=False)
    axes = v[:2].T
    signs = torch.sign(axes[axes.abs().argmax(0), torch.arange(2)])
    return (xc @ (axes * signs)).float()


def embedding_stats(img: torch.Tensor, txt: torch.Tensor, txt2img: Sequence[int]) -> dict[str, float]:
    """Alignment, uniformity (images, texts, both), modality gap, and the mean cosine of matching vs all pairs."""
    img, txt = F.normalize(img.double(), dim=-1), F.normalize(txt.double(), dim=-1)
    sims = txt @ img.T
    pos = sims[torch.arange(len(txt)), torch.as_tensor(list(txt2img))]
    return {
        "alignment": alignment(img, txt, txt2img),
        "uniformity_image": uniformity(img),
        "uniformity_text": uniformity(txt),
        "uniformity_joint": uniformity(torch.cat([img, txt])),
        "modality_gap": modality_gap(img, txt),
        "cos_matching": float(pos.mean()),
        "cos_all_pairs": float(sims.mean()),
        "num_images": len(img),
        "num_texts": len(txt),
    }


def text_ranks(img: torch.Tensor, txt: torch.Tensor, txt2img: Sequence[int]) -> torch.Tensor:
    """1-based rank of each text's own image among all images by cosine (pessimistic ties, as the metrics)."""
    sims = F.normalize(txt.float(), dim=-1) @ F.normalize(img.float(), dim=-1).T
    gt = sims[torch.arange(len(txt)), torch.as_tensor(list(txt2img))]
    return (sims > gt[:, None]).sum(1) + (sims == gt[:, None]).sum(1)


def rank_changes(ranks_a: torch.Tensor, ranks_b: torch.Tensor, k: int) -> tuple[list[int], list[int]]:
    """Text indices whose rank improved most (b much smaller than a) and worsened most, ``k`` each, ties by index."""
    delta = (ranks_b - ranks_a).tolist()
    order = sorted(range(len(delta)), key=lambda i: (delta[i], i))
    improved = [i for i in order[:k] if delta[i] < 0]
    worsened = [i for i in sorted(range(len(delta)), key=lambda i: (-delta[i], i))[:k] if delta[i] > 0]
    return improved, worsened


def grad_cam(tokens: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM over image tokens ``[N, D]``: ``relu(sum_d mean_n(grad)[d] * tokens[:, d])`` as a square grid,
    normalised to [0, 1]; a leading class token (``N = 1 + s*s``) is dropped."""
    n = tokens.shape[0]
    side = math.isqrt(n)
    if side * side != n:
        side = math.isqrt(n - 1)
        if side * side != n - 1:
            raise ValueError(f"cannot lay {n} image tokens on a square grid")
        tokens, grads = tokens[1:], grads[1:]
    weights = grads.float().mean(0)
    cam = torch.relu(tokens.float() @ weights).reshape(side, side)
    return cam / cam.max() if float(cam.max()) > 0 else cam


# ============================================================================ the runs
@dataclasses.dataclass
class Encoded:
    name: str
    kind: str
    model: Any
    split: Any
    img: dict[str, torch.Tensor]
    txt: dict[str, torch.Tensor]


def _run_model_name(run: Path) -> str | None:
    saved = run / "config.yaml"
    if not saved.is_file():
        return None
    model = (yaml.safe_load(saved.read_text()) or {}).get("model")
    return model.get("name") if isinstance(model, dict) else None


def _default_data_overrides(run: Path) -> list[str]:
    """``task.*_json`` and ``task.image_root`` from the data set the run trained on (a synthetic-style folder)."""
    saved = run / "config.yaml"
    if not saved.is_file():
        return []
    cfg = yaml.safe_load(saved.read_text()) or {}
    shards = (cfg.get("data") or {}).get("shards")
    task = cfg.get("task") or {}
    if isinstance(task, dict) and task.get("test_json"):
        return [f"task.{k}={task[k]}" for k in ("image_root", "val_json", "test_json") if task.get(k)]
    if not isinstance(shards, str):
        return []
    root = Path(os.path.dirname(shards)).parent  # <root>/train/{00000..00007}.tar -> <root>
    found = [f"task.image_root={root}"]
    for split in ("train", "val", "test"):
        path = root / f"{split}_retrieval.json"
        found.append(f"task.{split}_json={path if path.is_file() else 'none'}")
    return found


def run_names(runs: Sequence[Path]) -> list[str]:
    """Short names that tell the runs apart: the last path parts, as many as needed (``arm/seed0/pretrain``)."""
    parts = [Path(os.path.abspath(r)).parts for r in runs]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(r) for r in runs]


def load_run(run: Path, recipe: str, overrides: Sequence[str]) -> tuple[Any, Any, Any]:
    """(config, backbone with the run's weights, retrieval task) for ``run`` (a pretrain or fine-tune run dir)."""
    from finetune import tasks
    from finetune.config import FinetuneConfig
    from pretrain import models
    from pretrain.export import load_state

    if not run.is_dir():
        raise ConfigError(f"run: {run} is not a run folder")
    # a fine-tune run's best weights, else the run's latest checkpoint, else its export (load_state's rule)
    init = run / BEST if (run / BEST).is_file() else run
    name = _run_model_name(run)
    # the whole model section from the run (fine-tuning inherits every key a recipe leaves out from model.init)
    model = f"model={json.dumps({'name': name, 'init': str(run)})}" if name else f"model.init={run}"
    over = [*_default_data_overrides(run), model]
    cfg = load_config(FinetuneConfig, recipe, [*over, *overrides, "eval.qualitative=0"])
    _, build = models.get(cfg.model.name)
    torch.manual_seed(cfg.run.seed)
    backbone = build(cfg.model)
    state = load_state(str(init))
    if all(k.startswith("backbone.") for k in state):
        state = {k[len("backbone.") :]: v for k, v in state.items()}
    own = backbone.state_dict()
    shared = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not shared:
        raise ConfigError(f"run: no weight of {init} fits a {cfg.model.name} model")
    backbone.load_state_dict(shared, strict=False)
    backbone.eval()
    _, task_cls = tasks.get(cfg.task.name)
    return cfg, backbone, task_cls(cfg, 0, 1)


@torch.no_grad()
def encode(run: Path, recipe: str, overrides: Sequence[str], split: str) -> tuple[Encoded, Any]:
    """The run's image and text features on ``split`` (and the task, which opens the images)."""
    from finetune.tasks.retrieval import adapter_for, encode_split

    cfg, backbone, task = load_run(run, recipe, overrides)
    adapter = adapter_for(backbone)
    kept, img, txt, problems = encode_split(adapter, task.split(split), task.store, task.eval_tf, cfg.eval.batch_size)
    for p in problems:
        log.warning("image skipped: %s", p)
    return Encoded(run.name, adapter.kind, backbone, kept, img, txt), task


# ============================================================================ pictures
def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def projection_png(runs: list[Encoded], coords: list[torch.Tensor], path: Path, pairs: int = 12) -> Path:
    """One panel per run: images and texts in the 2-D PCA plane, ``pairs`` matching pairs joined by a line."""
    side, pad = 380, 24
    canvas = Image.new("RGB", (side * len(runs), side + 40), "white")
    d = ImageDraw.Draw(canvas)
    for r, (enc, xy) in enumerate(zip(runs, coords)):
        n_img = len(enc.split.images)
        lo, hi = xy.min(0).values, xy.max(0).values
        span = torch.clamp(hi - lo, min=1e-6)
        pts = ((xy - lo) / span * (side - 2 * pad) + pad).tolist()
        ox = r * side
        d.rectangle((ox + 4, 24, ox + side - 4, side + 20), outline=(200, 200, 200))
        d.text(
            (ox + side / 2, 10), f"{enc.name}: images (blue), texts (orange)", fill="black", font=_font(), anchor="mm"
        )
        for t in range(0, len(enc.split.texts), max(1, len(enc.split.texts) // pairs))[:pairs]:
            a, b = pts[enc.split.txt2img[t]], pts[n_img + t]
            d.line((ox + a[0], 20 + a[1], ox + b[0], 20 + b[1]), fill=(170, 170, 170))
        for i, (x, y) in enumerate(pts):
            c = IMAGE_COLOUR if i < n_img else TEXT_COLOUR
            d.ellipse((ox + x - 2, 20 + y - 2, ox + x + 2, 20 + y + 2), fill=c)
    canvas.save(path)
    return path


def _thumb(task: Any, split: Any, index: int, size: int) -> Image.Image:
    return task.store.open(split.images[index]).convert("RGB").resize((size, size))


def galleries_png(
    queries: list[dict[str, Any]], a: Encoded, b: Encoded, task: Any, path: Path, thumb: int = 72
) -> Path | None:
    """Per query: its text and ranks, run A's top-k row and run B's top-k row (ground truth framed green)."""
    if not queries:
        return None
    k = max(len(q["top_a"]) for q in queries)
    row_h = thumb + 16
    width, height = 230 + k * (thumb + 4), len(queries) * (2 * row_h + 10)
    canvas = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(canvas)
    y = 0
    for q in queries:
        text = q["text"]
        lines = [text[i : i + 34] for i in range(0, min(len(text), 136), 34)]
        d.multiline_text((4, y + 4), "\n".join(lines), fill="black", font=_font())
        d.text((4, y + 66), f"rank {q['rank_a']} -> {q['rank_b']}", fill="black", font=_font())
        for r, (enc, key) in enumerate(((a, "top_a"), (b, "top_b"))):
            ry = y + r * row_h
            d.text((160, ry + thumb / 2), enc.name[:10], fill="black", font=_font(), anchor="lm")
            for j, idx in enumerate(q[key]):
                x = 230 + j * (thumb + 4)
                canvas.paste(_thumb(task, a.split, idx, thumb), (x, ry + 2))
                if idx == q["gt_image"]:
                    d.rectangle((x - 1, ry + 1, x + thumb, ry + thumb + 2), outline=(0, 170, 0), width=3)
        y += 2 * row_h + 10
    canvas.save(path)
    return path


def gradcam_maps(enc: Encoded, pairs: int) -> list[dict[str, Any]]:
    """Grad-CAM of the ITM match logit over image tokens for the first caption of ``pairs`` images."""
    from finetune.tasks.retrieval import adapter_for

    adapter = adapter_for(enc.model)
    out = []
    step = max(1, len(enc.split.images) // pairs)
    for i in list(range(0, len(enc.split.images), step))[:pairs]:
        t = enc.split.img2txt[i][0]
        img = {k: v[i : i + 1].clone() for k, v in enc.img.items()}
        txt = {k: v[t : t + 1] for k, v in enc.txt.items()}
        tokens = img["tokens"].float().requires_grad_(True)
        img["tokens"] = tokens
        with torch.enable_grad():
            score = adapter.itm(img, torch.zeros(1, dtype=torch.long), txt, torch.zeros(1, dtype=torch.long))
            (grad,) = torch.autograd.grad(score.sum(), tokens)
        cam = grad_cam(tokens.detach()[0], grad[0])
        out.append({"image": i, "text": enc.split.texts[t], "score": float(score), "cam": cam})
    return out


def gradcam_png(task: Any, enc: Encoded, maps: list[dict[str, Any]], path: Path, size: int = 128) -> Path:
    canvas = Image.new("RGB", (len(maps) * (size + 8), size + 60), "white")
    d = ImageDraw.Draw(canvas)
    for j, m in enumerate(maps):
        base = _thumb(task, enc.split, m["image"], size)
        heat = Image.fromarray((m["cam"].numpy() * 255).astype("uint8"), "L").resize((size, size), Image.BILINEAR)
        red = Image.merge("RGB", (heat, Image.new("L", heat.size, 0), Image.new("L", heat.size, 0)))
        x = j * (size + 8)
        canvas.paste(Image.blend(base, red, 0.45), (x, 0))
        caption = m["text"]
        d.multiline_text((x, size + 4), "\n".join(caption[i : i + 22] for i in range(0, min(len(caption), 88), 22)),
                         fill="black", font=_font())  # fmt: skip
    canvas.save(path)
    return path


# ============================================================================ the command
def analyze(
    runs: list[Path], recipe: str = DEFAULT_RECIPE, overrides: Sequence[str] = (), split: str = "test",
    top_k: int = 5, queries: int = 4, pairs: int = 4,
) -> Path:  # fmt: skip
    """Analyse one run, or compare two; returns the output folder (PNG, ``analysis.json``, TensorBoard)."""
    encoded, task = [], None
    for run, name in zip(runs, run_names(runs)):
        enc, task = encode(run, recipe, overrides, split)
        enc.name = name
        encoded.append(enc)
    if len(encoded) == 2 and encoded[0].split.texts != encoded[1].split.texts:
        raise ConfigError("the two runs were evaluated on different annotation files; pass the same task.test_json")
    out = runs[0] / ("analysis" if len(runs) == 1 else f"analysis_vs_{encoded[1].name.replace('/', '_')}")
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"split": split, "runs": {}}
    figures: dict[str, Path] = {}
    coords = []
    for enc, run in zip(encoded, runs):
        entry: dict[str, Any] = {"path": str(run), "kind": enc.kind}
        if "emb" in enc.img:
            entry.update(embedding_stats(enc.img["emb"], enc.txt["emb"], enc.split.txt2img))
            coords.append(pca_2d(torch.cat([F.normalize(enc.img["emb"], dim=-1), F.normalize(enc.txt["emb"], dim=-1)])))
        else:
            entry["embeddings"] = "none: a single-stream model scores pairs jointly (ITM only)"
        if enc.kind in ("fusion", "single"):
            maps = gradcam_maps(enc, pairs)
            entry["gradcam"] = [{k: v for k, v in m.items() if k != "cam"} for m in maps]
            png = out / f"gradcam_{enc.name.replace('/', '_')}.png"
            figures[f"gradcam_{len(result['runs'])}"] = gradcam_png(task, enc, maps, png)
        result["runs"][enc.name if enc.name not in result["runs"] else f"{enc.name}_2"] = entry
    if len(coords) == len(encoded):
        figures["projection"] = projection_png(encoded, coords, out / "projection.png")
    if len(encoded) == 2 and all("emb" in e.img for e in encoded):
        a, b = encoded
        ra = text_ranks(a.img["emb"], a.txt["emb"], a.split.txt2img)
        rb = text_ranks(b.img["emb"], b.txt["emb"], b.split.txt2img)
        better, worse = rank_changes(ra, rb, queries)

        def top(enc: Encoded, t: int) -> list[int]:
            sims = F.normalize(enc.img["emb"].float(), dim=-1) @ F.normalize(enc.txt["emb"][t].float(), dim=0)
            return torch.sort(sims, descending=True, stable=True).indices[:top_k].tolist()

        rows = [{"text": a.split.texts[t], "text_index": t, "gt_image": a.split.txt2img[t], "rank_a": int(ra[t]),
                 "rank_b": int(rb[t]), "top_a": top(a, t), "top_b": top(b, t), "change": change}
                for change, picks in (("improved", better), ("worsened", worse)) for t in picks]  # fmt: skip
        result["rank_changes"] = {
            "ranking": "text -> image by embedding cosine",
            "median_rank": [float(ra.float().median()), float(rb.float().median())],
            "improved": int((rb < ra).sum()), "worsened": int((rb > ra).sum()), "same": int((rb == ra).sum()),
            "queries": rows,
        }  # fmt: skip
        png = galleries_png(rows, a, b, task, out / "rank_changes.png")
        if png:
            figures["rank_changes"] = png
    result["figures"] = {k: str(v) for k, v in figures.items()}
    (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    _tensorboard(out, result, figures)
    return out


def _tensorboard(out: Path, result: dict[str, Any], figures: dict[str, Path]) -> None:
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "tb"))
    for name, entry in result["runs"].items():
        for key, value in entry.items():
            if isinstance(value, float) and math.isfinite(value):
                writer.add_scalar(f"analysis/{name}/{key}", value, 0)
    for key, path in figures.items():
        writer.add_image(f"analysis/{key}", np.asarray(Image.open(path).convert("RGB")), 0, dataformats="HWC")
    writer.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune analyze", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="one run folder, or two to compare (key=value overrides after)")
    parser.add_argument("--config", default=DEFAULT_RECIPE, help="fine-tune recipe the model and data come from")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--top-k", type=int, default=5, help="gallery size of the rank-change queries")
    parser.add_argument("--queries", type=int, default=4, help="queries shown per direction (improved, worsened)")
    parser.add_argument("--pairs", type=int, default=4, help="Grad-CAM pairs (fusion models)")
    args = parser.parse_intermixed_args(argv)
    runs = [Path(r) for r in args.runs if "=" not in r]
    overrides = [r for r in args.runs if "=" in r]
    if not 1 <= len(runs) <= 2:
        print("config error: give one run folder, or two to compare", file=sys.stderr)
        return 2
    from launch.logging import setup_logging

    setup_logging()
    try:
        out = analyze(runs, args.config, overrides, args.split, args.top_k, args.queries, args.pairs)
    except (ConfigError, FileNotFoundError) as exc:
        hint = "(task.test_json=... / task.image_root=... name the evaluation data)"
        print(f"config error: {exc} {hint}", file=sys.stderr)
        return 2
    print(json.dumps(json.loads((out / "analysis.json").read_text())["runs"], indent=1))
    print(f"analysis: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
