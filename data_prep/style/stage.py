"""``python -m data_prep style --config configs/style/stage.yaml [key=value ...]``: style-randomize shards.

Reads shards in the project's layout (``data_prep.schema``) and writes the same layout to ``out.dir``: input shard
number ``i`` (position in the sorted expansion of ``data.shards``) becomes output shard ``{i:05d}.tar``. Per input
sample it writes the original (unchanged bytes, key unchanged) and/or stylized copies (key ``{key}_s{j}``), with the
captions and metadata kept and a ``style`` record added to the json (``stylized``, ``alpha``, ``seed``, ``draw``,
``draw_seed``, ``source_key``, ``model``):

* ``style.mode: copies``: ``style.k`` stylized copies per image, plus the original if ``style.keep_original``;
* ``style.mode: ratio``: the paper's ratio of unaugmented to augmented images, ``style.ratio: "u:a"`` ("16:1" ...
  "1:32"): every original is kept and image ``i`` of a shard gets ``floor((i+1)a/u) - floor(ia/u)`` copies.

Each draw's latent comes from ``sha256(seed:key:draw)`` and batches never span shards, so a shard's output does not
depend on the rank or worker count, and a resumed run writes the same bytes (the batch size only changes float
rounding). Ranks (torchrun / SLURM variables) take input shards
``i % world == rank``. DataLoader workers read and decode; the model runs batches in the main process (never in
workers: CUDA in forked workers fails, see the reference notes); JPEG encoding runs in a thread pool (PIL releases
the GIL) while the next batch is on the model. A shard whose ``_stats.json`` exists is skipped, so a killed run
resumes per shard. A corrupt sample is logged with its key and reason and passed through unchanged or skipped
(``style.on_error``).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from launch.config import (
    ConfigError,
    exists_field,
    exits_on_config_error,
    expand_shards,
    load_config,
    save_config,
    shards_field,
    to_dict,
)
from launch.dist import detect_env
from launch.logging import announce_run_folder, is_rank0, setup_logging
from launch.recipes import register as register_recipe

from ..paths import PathError, check_member_key
from ..schema import IMAGE_EXTS, captions_of
from ..shards import ShardWriter, read_stats, write_manifest
from ..tar_reader import iter_tar_samples
from .network import StylePredictor, StyleTransformer, load_style_checkpoint, predictor_for
from .sampling import EmbeddingSampler, StyleRandomizer, parse_ratio, ratio_copies, sample_seed
from .strad import check_stats, load_embedding_stats, load_public_predictor, load_public_transformer

log = logging.getLogger("vlp.style.stage")
GRID_NAME = "style_grid.png"


# --------------------------------------------------------------------------------------------------- configuration
@dataclasses.dataclass
class DataSection:
    shards: str = shards_field("")
    batch_size: int = 16
    num_workers: int = 2


@dataclasses.dataclass
class OutSection:
    dir: str = "runs/style_shards"
    jpeg_quality: int = 95
    grid_images: int = 4
    grid_styles: int = 4
    tensorboard: bool = True


@dataclasses.dataclass
class StyleSection:
    seed: int = 0
    alpha: float = 0.5
    mode: Literal["copies", "ratio"] = "copies"
    k: int = 1
    keep_original: bool = True
    ratio: str = "1:1"
    on_error: Literal["passthrough", "skip"] = "passthrough"


@dataclasses.dataclass
class ModelSection:
    checkpoint: str | None = exists_field(None)
    transformer: str | None = exists_field(None)
    predictor: str | None = exists_field(None)
    embeddings: str | None = exists_field(None)
    allow_unsafe_pickle: bool = False
    random_init: bool = False
    use_predictor: bool = True


@dataclasses.dataclass
class RuntimeSection:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    chunk: int = 0
    encode_threads: int = 2


@dataclasses.dataclass
class StageConfig:
    """Schema of ``configs/style/stage.yaml``."""

    data: DataSection = dataclasses.field(default_factory=DataSection)
    out: OutSection = dataclasses.field(default_factory=OutSection)
    style: StyleSection = dataclasses.field(default_factory=StyleSection)
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    runtime: RuntimeSection = dataclasses.field(default_factory=RuntimeSection)

    def validate(self, recipe: Any) -> None:
        if not self.data.shards:
            raise ConfigError("data.shards: required (input shard pattern)")
        if self.data.batch_size < 1:
            raise ConfigError("data.batch_size: must be >= 1")
        if self.data.num_workers < 0:
            raise ConfigError("data.num_workers: must be >= 0")
        if not 0.0 <= self.style.alpha <= 1.0:
            raise ConfigError(f"style.alpha: must be in [0, 1], got {self.style.alpha}")
        if self.style.mode == "copies" and self.style.k < 0:
            raise ConfigError("style.k: must be >= 0")
        if self.style.mode == "copies" and self.style.k == 0 and not self.style.keep_original:
            raise ConfigError("style.k=0 with style.keep_original=false writes nothing")
        if self.style.mode == "ratio":
            if str(self.style.ratio).isdigit():
                raise ConfigError(
                    f"style.ratio: got {self.style.ratio}; YAML reads an unquoted 16:1 as a base-60 number, "
                    'quote it in the file: ratio: "16:1"'
                )
            try:
                parse_ratio(self.style.ratio)
            except ValueError as exc:
                raise ConfigError(f"style.ratio: {exc}") from None
        if not 1 <= self.out.jpeg_quality <= 100:
            raise ConfigError("out.jpeg_quality: must be in 1..100")
        m = self.model
        sources = [bool(m.checkpoint), bool(m.transformer), m.random_init]
        if sum(sources) != 1:
            raise ConfigError(
                "model: set exactly one of model.checkpoint (our format), model.transformer (public "
                "checkpoint_transformer.pth) or model.random_init=true (tests/demo only)"
            )
        if m.checkpoint and (m.embeddings or m.predictor):
            raise ConfigError(
                "model.checkpoint carries its own predictor and statistics; unset model.embeddings/.predictor"
            )
        if (m.transformer or m.random_init) and not m.embeddings:
            raise ConfigError(
                "model.embeddings: required (checkpoint_embeddings.pth) with model.transformer or model.random_init"
            )
        if m.transformer and m.use_predictor and not m.predictor:
            raise ConfigError("model.predictor: required with model.use_predictor=true (or set use_predictor=false)")


# --------------------------------------------------------------------------------------------------- model


@register_recipe("data_prep style", StageConfig)
def load_stage_config(path: str | None, overrides: Sequence[str] = ()) -> StageConfig:
    """The validated ``data_prep style`` recipe (also what ``python -m launch`` checks before submitting)."""
    return load_config(StageConfig, path, overrides)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_randomizer(cfg: StageConfig, device: torch.device) -> tuple[StyleRandomizer, dict[str, Any]]:
    """The stylizer described by ``cfg.model`` and a record of where its weights came from."""
    m = cfg.model
    predictor: StylePredictor | None = None
    if m.checkpoint:
        ck = load_style_checkpoint(m.checkpoint)
        transformer = StyleTransformer()
        transformer.load_state_dict(ck["transformer"])
        if m.use_predictor:
            if ck["predictor"] is None:
                raise ConfigError(f"model.checkpoint {m.checkpoint} has no predictor; set model.use_predictor=false")
            predictor = predictor_for(ck["meta"])  # the architecture the checkpoint names (Inception by default)
            predictor.load_state_dict(ck["predictor"])
        stats = check_stats(ck["mean"], ck["cov"], ck["base"], m.checkpoint)
        info = {"kind": "checkpoint", "checkpoint": m.checkpoint, "sha256": _sha256(m.checkpoint)}
        info.update({k: ck["meta"][k] for k in ("predictor", "loss_network") if k in ck["meta"]})
    else:
        stats = load_embedding_stats(m.embeddings or "", m.allow_unsafe_pickle)
        info = {"embeddings": m.embeddings, "embeddings_sha256": _sha256(m.embeddings or "")}
        if m.transformer:
            transformer = load_public_transformer(m.transformer, m.allow_unsafe_pickle)
            info.update(kind="public", transformer=m.transformer, transformer_sha256=_sha256(m.transformer))
            if m.use_predictor:
                predictor = load_public_predictor(m.predictor or "", m.allow_unsafe_pickle)
                info.update(predictor=m.predictor, predictor_sha256=_sha256(m.predictor or ""))
        else:
            # Demo/test path: random weights seeded from the run seed, real embedding statistics.
            log.warning("model.random_init=true: RANDOM transformer/predictor weights, for tests and demos ONLY")
            torch.manual_seed(cfg.style.seed)
            transformer = StyleTransformer()
            predictor = StylePredictor() if m.use_predictor else None
            info.update(kind="random_init (tests/demo only)", init_seed=cfg.style.seed)
    info["use_predictor"] = predictor is not None
    randomizer = StyleRandomizer(
        transformer,
        EmbeddingSampler(stats.mean, stats.cov),
        predictor,
        base_embedding=stats.base,
        alpha=cfg.style.alpha,
        precision=cfg.runtime.precision,
        chunk=cfg.runtime.chunk,
    )
    return randomizer.to(device), info


# --------------------------------------------------------------------------------------------------- reading
@dataclasses.dataclass
class InputSample:
    """One input sample after decoding in a worker; ``error`` set when it is corrupt."""

    key: str
    raw: dict[str, bytes]
    image: torch.Tensor | None = None  # uint8 [3,H,W]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    caption: str = ""
    error: str | None = None


def decode_sample(key: str, raw: dict[str, bytes]) -> InputSample:
    """Decode image, json and caption; corrupt parts set ``error`` (short reason + detail) instead of raising."""
    s = InputSample(key=key, raw=raw)
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"json is a {type(meta).__name__}, not an object")
            s.meta = meta
        except (ValueError, UnicodeDecodeError) as exc:
            s.error = f"bad json: {str(exc)[:120]}"
    caps = captions_of({"json": s.meta, "txt": raw.get("txt")})
    s.caption = caps[0] if caps else ""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        s.error = s.error or "no image"
        return s
    try:
        with Image.open(io.BytesIO(raw[ext])) as img:
            img.load()
            rgb = img.convert("RGB")
        s.image = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is "corrupt image", reported by key
        s.error = s.error or f"not an image: {type(exc).__name__}: {str(exc)[:120]}"
        s.image = None
    return s


class ShardChunks(torch.utils.data.IterableDataset):
    """Yields ``{"shard", "samples", "last", "read_error"}`` chunks of up to ``batch_size`` decoded samples.

    Worker ``w`` of ``n`` takes this rank's shards ``w::n``; a chunk never spans two shards and every shard ends
    with a chunk marked ``last`` (possibly empty), so the main process knows when to finish it.
    """

    def __init__(self, shards: Sequence[tuple[int, str]], batch_size: int) -> None:
        self.shards = list(shards)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for shard_id, path in mine:
            buf: list[InputSample] = []
            read_error = None
            try:
                for key, raw in iter_tar_samples(path):
                    buf.append(decode_sample(key, raw))
                    if len(buf) == self.batch_size:
                        yield {"shard": shard_id, "samples": buf, "last": False, "read_error": None}
                        buf = []
            except (tarfile.TarError, OSError, EOFError) as exc:
                read_error = f"{path}: unreadable tar after {len(buf)} buffered samples: {type(exc).__name__}: {exc}"
            yield {"shard": shard_id, "samples": buf, "last": True, "read_error": read_error}


def _collate(chunk: dict[str, Any]) -> dict[str, Any]:
    return chunk


# --------------------------------------------------------------------------------------------------- writing
@dataclasses.dataclass
class _Output:
    key: str
    caption: str
    meta: dict[str, Any]
    jpg: bytes | None = None  # ready bytes (originals), else encoded from ``image``
    image: torch.Tensor | None = None  # uint8 [3,H,W] stylized


@dataclasses.dataclass
class _ShardState:
    writer: ShardWriter
    started: float
    counts: Counter = dataclasses.field(default_factory=Counter)
    reasons: Counter = dataclasses.field(default_factory=Counter)
    failures: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    index: int = 0  # position of the next input sample in this shard


def encode_jpeg(image: torch.Tensor, quality: int) -> bytes:
    """uint8 [3,H,W] -> JPEG bytes (4:2:0, baseline; deterministic for the same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _original_jpg(s: InputSample, quality: int) -> bytes:
    for ext in ("jpg", "jpeg"):
        if ext in s.raw:
            return s.raw[ext]
    assert s.image is not None
    return encode_jpeg(s.image, quality)  # png/webp input: the shard contract says {key}.jpg


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0,1] float -> uint8 with rounding (what PIL's ToTensor inverse does)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


class StyleStage:
    """The stage for one rank: plan outputs per sample, stylize in batches, encode in threads, write in order."""

    def __init__(
        self,
        cfg: StageConfig,
        randomizer: StyleRandomizer,
        model_info: dict[str, Any],
        inputs: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.inputs = dict(enumerate(inputs))
        self.randomizer = randomizer
        self.model_info = model_info
        self.out_dir = cfg.out.dir
        st = cfg.style
        self.ratio = parse_ratio(st.ratio) if st.mode == "ratio" else None
        self.settings = {
            "mode": st.mode,
            "k": st.k if st.mode == "copies" else None,
            "keep_original": st.keep_original if st.mode == "copies" else True,
            "ratio": st.ratio if st.mode == "ratio" else None,
            "alpha": st.alpha,
            "seed": st.seed,
            "on_error": st.on_error,
            "jpeg_quality": cfg.out.jpeg_quality,
            "model": model_info.get("kind"),
            "use_predictor": model_info.get("use_predictor"),
        }
        self.model_tag = str(model_info.get("kind"))

    # -- planning
    def copies(self, index: int) -> int:
        if self.ratio is not None:
            return ratio_copies(index, *self.ratio)
        return self.cfg.style.k

    def keep_original(self) -> bool:
        return self.ratio is not None or self.cfg.style.keep_original

    def style_record(self, key: str, draw: int | None) -> dict[str, Any]:
        if draw is None:
            return {"stylized": False, "source_key": key}
        st = self.cfg.style
        return {
            "stylized": True,
            "alpha": st.alpha,
            "seed": st.seed,
            "draw": draw,
            "draw_seed": sample_seed(st.seed, key, draw),
            "source_key": key,
            "model": self.model_tag,
            "use_predictor": bool(self.model_info.get("use_predictor")),
        }

    def plan(self, state: _ShardState, samples: Sequence[InputSample]) -> tuple[list[_Output], list[tuple]]:
        """Outputs in write order, and the (output index, image, seed) triples that need the network."""
        outputs: list[_Output] = []
        jobs: list[tuple[int, torch.Tensor, int]] = []
        q = self.cfg.out.jpeg_quality
        for s in samples:
            index = state.index
            state.index += 1
            state.counts["input"] += 1
            try:
                check_member_key(s.key)
            except PathError as exc:
                # the output would be written under this name: never copy an unsafe one (../x, /abs/x)
                log.warning("shard %05d: %s: skipped", state.writer.shard_id, exc)
                state.reasons[exc.reason] += 1
                state.failures.append({"key": s.key, "reason": exc.reason, "detail": exc.detail, "action": "skipped"})
                continue
            if s.error is not None:
                action = "passthrough" if self.cfg.style.on_error == "passthrough" else "skipped"
                image_ext = next((e for e in IMAGE_EXTS if e in s.raw), None)
                if image_ext is None:
                    action = "skipped"  # nothing to pass through: the contract needs an image member
                log.warning("shard %05d: corrupt sample %s (%s): %s", state.writer.shard_id, s.key, s.error, action)
                reason = s.error.split(":", 1)[0]
                state.reasons[reason] += 1
                state.failures.append({"key": s.key, "reason": reason, "detail": s.error, "action": action})
                if action == "passthrough":
                    meta = dict(s.meta)
                    meta["style"] = {"stylized": False, "source_key": s.key, "error": s.error}
                    outputs.append(_Output(s.key, s.caption, meta, jpg=s.raw[image_ext or ""]))
                    state.counts["passthrough"] += 1
                continue
            if self.keep_original():
                meta = dict(s.meta)
                meta["style"] = self.style_record(s.key, None)
                outputs.append(_Output(s.key, s.caption, meta, jpg=_original_jpg(s, q)))
                state.counts["originals"] += 1
            assert s.image is not None
            for j in range(self.copies(index)):
                meta = dict(s.meta)
                meta["style"] = self.style_record(s.key, j)
                jobs.append((len(outputs), s.image, meta["style"]["draw_seed"]))
                outputs.append(_Output(f"{s.key}_s{j}", s.caption, meta))
                state.counts["stylized"] += 1
        return outputs, jobs

    # -- the network
    def stylize(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> list[torch.Tensor]:
        """Stylize uint8 images (sizes may differ: equal sizes are batched together); returns uint8 on CPU."""
        out: list[torch.Tensor | None] = [None] * len(images)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape[-2:]), []).append(i)
        bs = self.cfg.data.batch_size
        for idx in by_size.values():
            # P(c) once per distinct source image, however many copies it gets.
            first: dict[int, int] = {}
            for i in idx:
                first.setdefault(id(images[i]), len(first))
            uniq = list({id(images[i]): images[i] for i in idx}.values())
            base = torch.cat(
                [
                    self.randomizer.predict_base(torch.stack(uniq[s : s + bs]).float().div_(255))
                    for s in range(0, len(uniq), bs)
                ]
            )
            for start in range(0, len(idx), bs):
                part = idx[start : start + bs]
                x = torch.stack([images[i] for i in part]).float().div_(255)
                z = self.randomizer.sampler.sample_seeded([seeds[i] for i in part])
                b = base[[first[id(images[i])] for i in part]]
                y = to_uint8(self.randomizer(x, z_rand=z, base=b)).cpu()
                for i, yi in zip(part, y):
                    out[i] = yi
        return [o for o in out if o is not None]

    # -- the demo grid
    def write_grid(self, samples: Sequence[InputSample]) -> str | None:
        """PNG grid: one row per image, the original then ``grid_styles`` random stylizations (rank 0)."""
        n_img, n_sty = self.cfg.out.grid_images, self.cfg.out.grid_styles
        good = [s for s in samples if s.image is not None][:n_img]
        if not good or n_img < 1:
            return None
        h, w = good[0].image.shape[-2:]  # type: ignore[union-attr]
        rows = []
        for s in good:
            img = s.image.float().div(255)[None]  # type: ignore[union-attr]
            if img.shape[-2:] != (h, w):
                img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
            seeds = [sample_seed(self.cfg.style.seed, f"grid:{s.key}", j) for j in range(n_sty)]
            styl = self.randomizer(img.expand(n_sty, -1, -1, -1), z_rand=self.randomizer.sampler.sample_seeded(seeds))
            rows.append(torch.cat([img.cpu(), styl.cpu()], dim=0))
        grid = torch.cat(rows, dim=0)  # [(n_img * (1+n_sty)), 3, h, w]
        import torchvision.utils as vutils

        sheet = vutils.make_grid(grid, nrow=1 + n_sty, padding=2, pad_value=1.0)
        path = os.path.join(self.out_dir, GRID_NAME)
        tmp = path + f".tmp.{os.getpid()}"
        Image.fromarray(to_uint8(sheet).permute(1, 2, 0).numpy()).save(tmp, format="PNG")
        os.replace(tmp, path)
        if self.cfg.out.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                with SummaryWriter(os.path.join(self.out_dir, "tensorboard")) as tb:
                    tb.add_image("style/originals_and_stylizations", sheet, 0)
                    tb.add_text("style/model", json.dumps(self.model_info), 0)
            except ImportError:
                log.warning("tensorboard is not installed; skipped the TensorBoard image")
        return path

    # -- the loop
    def run(self, shards: Sequence[tuple[int, str]], make_grid: bool) -> dict[str, Any]:
        cfg = self.cfg
        loader = torch.utils.data.DataLoader(
            ShardChunks(shards, cfg.data.batch_size),
            batch_size=None,
            num_workers=min(cfg.data.num_workers, len(shards)),
            collate_fn=_collate,
            persistent_workers=False,
        )
        states: dict[int, _ShardState] = {}
        pending: list[tuple[int, list[_Output], list[cf.Future | None], bool, str | None]] = []
        summary: Counter = Counter()
        t0 = time.time()
        pool = cf.ThreadPoolExecutor(max_workers=max(1, cfg.runtime.encode_threads))

        def flush(keep: int) -> None:
            while len(pending) > keep:
                shard, outputs, futs, last, read_error = pending.pop(0)
                st = states[shard]
                for o, fut in zip(outputs, futs):
                    st.writer.write(o.key, o.jpg if fut is None else fut.result(), o.caption, o.meta)
                if last:
                    self._finish(shard, st, read_error)
                    summary["shards"] += 1
                    for k, v in st.counts.items():
                        summary[k] += v
                    del states[shard]

        from tqdm import tqdm

        # input images of this rank, with img/s (the total is unknown until the tars are read)
        bar = tqdm(desc="style", unit="img", disable=not is_rank0(), dynamic_ncols=True)
        try:
            for chunk in loader:
                bar.update(len(chunk["samples"]))
                shard = chunk["shard"]
                if shard not in states:
                    states[shard] = _ShardState(ShardWriter(self.out_dir, shard), time.time())
                st = states[shard]
                outputs, jobs = self.plan(st, chunk["samples"])
                if make_grid and chunk["samples"]:
                    self.write_grid(chunk["samples"])
                    make_grid = False
                styled = self.stylize([j[1] for j in jobs], [j[2] for j in jobs])
                for (pos, _, _), img in zip(jobs, styled):
                    outputs[pos].image = img
                futs = [
                    None if o.image is None else pool.submit(encode_jpeg, o.image, cfg.out.jpeg_quality)
                    for o in outputs
                ]
                pending.append((shard, outputs, futs, chunk["last"], chunk["read_error"]))
                flush(keep=1)  # encode of this chunk overlaps the model on the next one
            flush(keep=0)
        finally:
            bar.close()
            pool.shutdown(wait=True)
            for st in states.values():  # unfinished (error/kill): drop the temp tar, no done-marker
                st.writer.__exit__(None, None, None)
        summary["seconds"] = time.time() - t0
        return dict(summary)

    def _finish(self, shard: int, st: _ShardState, read_error: str | None) -> None:
        if read_error:
            log.error("shard %05d: %s", shard, read_error)
            st.reasons["unreadable tar"] += 1
            st.failures.append({"key": None, "reason": "unreadable tar", "detail": read_error, "action": "truncated"})
        stats = {
            "count": st.counts["input"],
            "successes": st.writer.count,
            "failed": sum(st.reasons.values()),
            "failures": dict(sorted(st.reasons.items())),
            "originals": st.counts["originals"],
            "stylized": st.counts["stylized"],
            "passthrough": st.counts["passthrough"],
            "input": self.inputs.get(shard),
            "settings": self.settings,
            "seconds": round(time.time() - st.started, 3),
        }
        st.writer.finish(stats, st.failures)
        log.info(
            "shard %05d: %d inputs -> %d originals + %d stylized (%d corrupt)",
            shard,
            st.counts["input"],
            st.counts["originals"],
            st.counts["stylized"],
            stats["failed"],
        )


# --------------------------------------------------------------------------------------------------- entry point
def _device(cfg: StageConfig, local_rank: int) -> torch.device:
    want = cfg.runtime.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("runtime.device=cuda but CUDA is not available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _check_settings(out_dir: str, settings: dict[str, Any]) -> None:
    for shard, st in sorted(read_stats(out_dir).items()):
        old = st.get("settings")
        if old is not None and old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(
                f"out.dir: {out_dir} holds shard {shard:05d} made with different settings ({', '.join(diff)}); "
                "use a new out.dir or delete it"
            )


def run(cfg: StageConfig) -> dict[str, Any]:
    """Run the stage for this process's rank; returns a summary (counts, seconds, shards skipped)."""
    env = detect_env()
    inputs = expand_shards(cfg.data.shards)
    if not inputs:
        raise ConfigError(f"data.shards: no shard files match {cfg.data.shards!r}")
    os.makedirs(cfg.out.dir, exist_ok=True)
    device = _device(cfg, env.local_rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    randomizer, info = build_randomizer(cfg, device)
    stage = StyleStage(cfg, randomizer, info, inputs)
    _check_settings(cfg.out.dir, stage.settings)
    done = set(read_stats(cfg.out.dir))
    mine = [(i, p) for i, p in enumerate(inputs) if i % env.world_size == env.rank]
    todo = [(i, p) for i, p in mine if i not in done]
    log.info(
        "rank %d/%d: %d input shards, %d already done, %d to do; model=%s device=%s",
        env.rank,
        env.world_size,
        len(mine),
        len(mine) - len(todo),
        len(todo),
        info["kind"],
        device,
    )
    if env.rank == 0:
        save_config(cfg, os.path.join(cfg.out.dir, "style_config.yaml"))
    summary = stage.run(todo, make_grid=env.rank == 0) if todo else {"shards": 0}
    summary["skipped"] = len(mine) - len(todo)
    if summary.get("seconds"):
        summary["images_per_s"] = summary.get("stylized", 0) / summary["seconds"]
    # Whoever sees every shard done writes the manifest (no process group needed; the write is atomic).
    finished = set(read_stats(cfg.out.dir))
    if finished >= set(range(len(inputs))):
        build = {"style": to_dict(cfg), "model": info, "inputs": inputs}
        write_manifest(cfg.out.dir, f"style:{cfg.data.shards}", build)
        summary["manifest"] = True
    else:
        missing = sorted(set(range(len(inputs))) - finished)
        log.info("manifest not written yet: %d shards not done (%s ...)", len(missing), missing[:5])
    return summary


@exits_on_config_error
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep style",
        description=__doc__.split("\n\n")[0],
        epilog="recipe keys: docs/style.md",
    )
    parser.add_argument("--config", help="YAML recipe (configs/style/stage.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. style.k=2")
    args = parser.parse_args(list(argv) if argv is not None else None)
    env = detect_env()
    setup_logging(env.rank)
    cfg = load_stage_config(args.config, args.overrides)
    announce_run_folder(cfg.out.dir, "output folder")
    summary = run(cfg)
    log.info("style stage done: %s", json.dumps(summary, default=str))
    return 0


__all__ = ["StageConfig", "StyleStage", "build_randomizer", "decode_sample", "main", "run"]
