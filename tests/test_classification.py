"""Classification fine-tuning: the STL-10 / Office-31 / synthetic readers, the augmentation policies, corrupt images,
and a tiny end-to-end policy sweep under the shared engine."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO, build_synthetic, read_metrics, subprocess_env
from PIL import Image
from torch import nn

from finetune.classification_data import read_office31, read_stl10, read_synthetic
from finetune.tasks.classification import (
    ClassificationModel,
    ClassificationOptions,
    ClassificationTask,
    LabelLoader,
    TraditionalTransform,
    build_style_augment,
)
from launch.config import ConfigError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _jpg(path: Path, colour: tuple[int, int, int], size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


class TinyBackbone(nn.Module):
    """A stand-in pretrained model: a ``visual`` tower (mean colour) and an unused text part."""

    def __init__(self) -> None:
        super().__init__()
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.visual.num_features = 4
        self.text = nn.Linear(2, 2)


def _cfg(opts: ClassificationOptions, image_size: int = 24) -> SimpleNamespace:
    return SimpleNamespace(
        task=opts,
        data=SimpleNamespace(image_size=image_size, mean=MEAN, std=STD, batch_size=2, num_workers=0),
        eval=SimpleNamespace(batch_size=4, num_workers=0, metric="top1"),
        run=SimpleNamespace(seed=0),
    )


# ------------------------------------------------------------------------------------------------- readers


def test_stl10_reader_transposes_the_column_major_layout(tmp_path):
    # image n: red = row index, green = column index, blue = n (distinguishes H from W and images)
    y, x = np.mgrid[0:96, 0:96]
    images = np.stack([np.stack([y, x, np.full_like(y, n)], axis=-1) for n in range(3)]).astype(np.uint8)
    # the official files store each channel column-major (Fortran order: the row index varies fastest)
    raw = b"".join(images[n, :, :, c].flatten(order="F").tobytes() for n in range(3) for c in range(3))
    (tmp_path / "train_X.bin").write_bytes(raw)
    (tmp_path / "train_y.bin").write_bytes(bytes([1, 10, 4]))
    (tmp_path / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n")
    ds = read_stl10(tmp_path, "train")
    assert ds.labels == [0, 9, 3] and ds.classes[9] == "c9" and len(ds) == 3
    img = np.asarray(ds.store.open(1))
    assert img.shape == (96, 96, 3)
    assert img[5, 70, 0] == 5 and img[5, 70, 1] == 70 and img[5, 70, 2] == 1  # (row 5, column 70) of image 1
    # a truncated file and an out-of-range label are clear errors naming the file
    (tmp_path / "test_X.bin").write_bytes(raw[:-7])
    (tmp_path / "test_y.bin").write_bytes(bytes([1, 2, 3]))
    with pytest.raises(ValueError, match="test_X.bin"):
        read_stl10(tmp_path, "test")
    (tmp_path / "train_y.bin").write_bytes(bytes([1, 11, 4]))
    with pytest.raises(ValueError, match="label 11 at row 1"):
        read_stl10(tmp_path, "train")


@pytest.fixture
def office(tmp_path) -> Path:
    root = tmp_path / "office31"
    colours = {"back_pack": (200, 20, 20), "bike": (20, 20, 200)}
    for dom, sub in (("amazon", "images"), ("dslr", ""), ("webcam", "images")):
        for cls, col in colours.items():
            for i in range(3):
                _jpg(root / dom / sub / cls / f"{i}.jpg", col)
    _jpg(root / "amazon" / "images" / "calculator" / "0.jpg", (20, 200, 20))  # a class only amazon has
    (root / "webcam" / "images" / "bike" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_office31_trains_on_two_domains_and_tests_on_the_third(office):
    train = read_office31(office, ["amazon", "dslr"])
    test = read_office31(office, ["webcam"])
    assert train.classes == test.classes == ["back_pack", "bike", "calculator"]
    assert sorted(set(train.domains)) == ["amazon", "dslr"] and len(train) == 13
    assert set(test.domains) == {"webcam"} and len(test) == 7  # 6 images + the broken file
    bike = test.classes.index("bike")
    assert all(lab == bike for ref, lab in zip(test.refs, test.labels) if "/bike/" in ref)
    with pytest.raises(FileNotFoundError, match="webcamm"):
        read_office31(office, ["webcamm"])


def test_corrupt_images_are_reported_and_skipped(office, caplog):
    opts = ClassificationOptions(dataset="office31", root=str(office), train_domains=("amazon",),
                                 test_domains=("webcam",))  # fmt: skip
    task = ClassificationTask(_cfg(opts))
    backbone = TinyBackbone()
    ClassificationModel(backbone, 3)
    with caplog.at_level(logging.WARNING):
        metrics = task.evaluate(backbone, "test")
    assert metrics["num_images"] == 6 and metrics["failed_images"] == 1
    assert "broken.jpg" in caplog.text
    # training: the broken image is replaced by the next readable one and counted
    ds = task.data("test")
    loader = LabelLoader(ds, task.eval_tf, batch_size=7, seed=0, rank=0, world=1, num_workers=0)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(loader))
    assert batch["image"].shape == (7, 3, 24, 24) and batch["skipped"] == 1 and loader.skipped == 1
    assert batch["label"].tolist() == [ds.labels[i] for i in batch["image_id"].tolist()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """Labelled scenes in every split (48 train, 12 val, 24 test) of 32 px, in shards of 16."""
    return build_synthetic(
        tmp_path_factory.mktemp("synthetic"), image_size=32, samples_per_shard=16, train=48, val=12, test=24
    )


def test_synthetic_domain_split(synthetic):
    from data_prep.sources.synthetic import SHAPES

    train = read_synthetic(synthetic, "train", ["plain", "striped"])
    test = read_synthetic(synthetic, "test", ["pastel"])
    rows = [json.loads(x) for x in (synthetic / "train_scenes.jsonl").read_text().splitlines()]
    expected = [r for r in rows if r["scene"]["domain"] in ("plain", "striped")]
    assert len(train) == len(expected) > 0 and set(train.domains) <= {"plain", "striped"}
    assert train.labels == [SHAPES.index(r["label"]) for r in expected]
    assert len(test) > 0 and set(test.domains) == {"pastel"}
    img = train.store.open(train.refs[0])  # read from inside the shard
    assert img.size == (32, 32)


def test_whole_domain_test_set_is_every_split_of_the_held_out_domain(synthetic):
    opts = ClassificationOptions(root=str(synthetic), train_domains=("plain", "striped"), test_domains=("pastel",),
                                 test_whole_domain=True)  # fmt: skip
    opts.validate(None)
    task = ClassificationTask(_cfg(opts))
    test, train = task.data("test"), task.data("train")
    pastel = set()
    for split in ("train", "val", "test"):
        for line in (synthetic / f"{split}_scenes.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["scene"]["domain"] == "pastel":
                pastel.add(f"{row['shard']}/{row['key']}.jpg")
    assert sorted(test.refs) == sorted(pastel) and len(test) > len(read_synthetic(synthetic, "test", ["pastel"]))
    assert not set(test.refs) & set(train.refs)
    # overlapping or missing train domains would test on trained images: refused
    for bad in ({"train_domains": ("plain", "pastel")}, {"train_domains": ()}):
        kw = {"train_domains": ("plain", "striped"), "test_domains": ("pastel",), **bad}
        with pytest.raises(ConfigError, match="test_whole_domain"):
            ClassificationOptions(root=".", test_whole_domain=True, **kw).validate(None)


# ------------------------------------------------------------------------------------------- augmentation


def test_policies_change_or_keep_images(synthetic):
    opts = ClassificationOptions(root=str(synthetic), augment="none")
    task = ClassificationTask(_cfg(opts, 32))
    img = task.data("train").store.open(task.data("train").refs[0])
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    plain = task.eval_tf(img)
    assert torch.equal(task.train_transform()(img, gen()), plain)  # none: the evaluation resize only
    task.opts = ClassificationOptions(root=str(synthetic), augment="traditional")
    trad = task.train_transform()
    assert isinstance(trad, TraditionalTransform)
    a, b = trad(img, gen()), trad(img, gen())
    assert torch.equal(a, b) and a.shape == plain.shape  # same generator, same draws
    assert not torch.equal(a, plain)
    assert not torch.equal(trad(img, torch.Generator().manual_seed(8)), a)
    task.opts = ClassificationOptions(root=str(synthetic), augment="style")
    assert task.train_transform() is task.eval_tf  # style happens in the training step, not in the loader


@pytest.fixture(scope="module")
def style_checkpoint(tmp_path_factory) -> Path:
    from data_prep.style.network import StyleTransformer, save_style_checkpoint

    path = tmp_path_factory.mktemp("style") / "style.safetensors"
    torch.manual_seed(0)
    save_style_checkpoint(path, StyleTransformer(), None, torch.zeros(100), torch.eye(100) * 0.1)
    return path


def test_style_policy_stylizes_the_chosen_fraction(style_checkpoint):
    images = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    common = {"root": ".", "style_checkpoint": str(style_checkpoint), "style_use_predictor": False}
    all_on = build_style_augment(ClassificationOptions(style_p=1.0, **common), MEAN, STD)
    out, mask = all_on.apply(images, torch.Generator().manual_seed(1))
    assert mask.all() and all(not torch.equal(out[i], images[i]) for i in range(6))
    # stylized images are valid normalized images: de-normalized they lie in [0, 1]
    assert (out * STD[0] + MEAN[0]).min() >= -1e-5 and (out * STD[0] + MEAN[0]).max() <= 1 + 1e-5
    off = build_style_augment(ClassificationOptions(style_p=0.0, **common), MEAN, STD)
    assert torch.equal(off(images, torch.Generator().manual_seed(1)), images)
    half = build_style_augment(ClassificationOptions(style_ratio="1:1", **common), MEAN, STD)
    out, mask = half.apply(images, torch.Generator().manual_seed(3))
    for i in range(6):
        assert torch.equal(out[i], images[i]) != bool(mask[i])
    # inside the training module: seeded by (seed, step, rank), so the same step stylizes identically
    model = ClassificationModel(TinyBackbone(), 3, style=all_on, image_log_every=1, mean=MEAN, std=STD)
    batch = {"image": images, "label": torch.tensor([0, 1, 2, 0, 1, 2]), "step": 4}
    first, second = model(batch)["loss"], model(batch)["loss"]
    assert first.item() == second.item()
    assert set(model.images_to_log()) == {"original", "stylized"}
    # the stylizer's weights are not part of the trained/checkpointed module; the text part is frozen
    assert not any("style" in n for n in model.state_dict())
    assert not any(p.requires_grad for p in model.backbone.text.parameters())


def test_eval_stylized_feeds_every_test_image_stylized(synthetic, style_checkpoint):
    common = {"root": str(synthetic), "style_checkpoint": str(style_checkpoint), "style_use_predictor": False,
              "style_p": 0.0}  # fmt: skip  (style_p is the training fraction; the diagnostic stylizes all)
    seen: dict[bool, list[torch.Tensor]] = {False: [], True: []}
    backbone = TinyBackbone()
    ClassificationModel(backbone, 6)
    for stylized in (False, True, True):
        task = ClassificationTask(_cfg(ClassificationOptions(eval_stylized=stylized, **common), image_size=32))
        inputs: list[torch.Tensor] = []
        hook = backbone.visual.register_forward_pre_hook(lambda m, args, got=inputs: got.append(args[0].clone()))
        metrics = task.evaluate(backbone, "test")
        hook.remove()
        assert metrics["num_images"] == len(task.data("test"))
        if seen[stylized]:  # the same styles on a second evaluation: models are compared on one stylized set
            assert all(torch.equal(a, b) for a, b in zip(seen[stylized], inputs))
        seen[stylized] = inputs
    clean, styled = torch.cat(seen[False]), torch.cat(seen[True])
    assert clean.shape == styled.shape
    assert all(not torch.allclose(clean[i], styled[i]) for i in range(len(clean)))
    with pytest.raises(ConfigError, match="task.style_checkpoint"):
        ClassificationOptions(root=".", eval_stylized=True).validate(None)


def test_eval_only_of_a_fine_tuned_run_restores_its_head(synthetic, tmp_path, caplog):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    trained = TinyBackbone()
    model = ClassificationModel(trained, 6)
    ckpt = tmp_path / "best.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))  # backbone.* keys, as saved
    opts = ClassificationOptions(root=str(synthetic))
    cfg = _cfg(opts, image_size=32)
    expected = ClassificationTask(cfg).evaluate(trained, "test")
    fresh = TinyBackbone()  # the tower loaded by model.init, no head yet (what --eval-only builds)
    fresh.visual.load_state_dict(trained.visual.state_dict())
    cfg.model = SimpleNamespace(init=str(ckpt))
    assert ClassificationTask(cfg).evaluate(fresh, "test") == expected
    assert torch.equal(fresh.cls_head.weight, trained.cls_head.weight)
    # an init without the head (a pretrain run) evaluates an untrained head, and says so
    bare = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in TinyBackbone().state_dict().items()}, str(bare))
    cfg.model = SimpleNamespace(init=str(bare))
    with caplog.at_level(logging.WARNING):
        ClassificationTask(cfg).evaluate(TinyBackbone(), "test")
    assert "untrained classifier" in caplog.text


def test_config_checks():
    opts = ClassificationOptions(root=".", augment="style")
    with pytest.raises(ConfigError, match="task.style_checkpoint"):
        opts.validate(SimpleNamespace(eval=SimpleNamespace(metric="top1")))
    with pytest.raises(ConfigError, match="eval.metric"):
        ClassificationOptions(root=".").validate(SimpleNamespace(eval=SimpleNamespace(metric="r_mean")))
    with pytest.raises(ConfigError, match="task.policies"):
        ClassificationOptions(root=".", policies=("none", "mixup")).validate(None)
    with pytest.raises(ConfigError, match="Office-31"):
        ClassificationOptions(root=".", dataset="office31").validate(None)


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_policy_sweep_end_to_end(synthetic, style_checkpoint, tmp_path):
    run_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune.tasks.classification", "--config",
         "configs/finetune/classification_synthetic.yaml", f"run.dir={run_dir}", f"task.root={synthetic}",
         f"task.style_checkpoint={style_checkpoint}", "task.style_use_predictor=false", "task.style_p=1.0",
         "model.vision.name=test_resnet", "data.image_size=32", "model.image_size=32", "data.batch_size=8",
         "data.num_workers=0", "train.max_steps=3", "train.warmup_steps=1", "train.log_every=1",
         "eval.every=3"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    policies = ["none", "traditional", "style", "traditional+style"]
    assert sorted(results["policies"]) == sorted(policies)
    for p in policies:
        one = json.loads((run_dir / p / "results.json").read_text())
        assert one["splits"]["test"]["top1"] == results["policies"][p]["test"]
        n = one["splits"]["test"]["num_images"]
        assert (one["splits"]["test"]["top1"] * n / 100.0) % 1 < 1e-6  # a whole number of correct images
        assert one["splits"]["test"]["num_images"] == len(read_synthetic(synthetic, "test", ["pastel"]))
    table = (run_dir / "results.md").read_text()
    assert all(f"| {p} |" in table for p in policies)
    # same seed, same data order: the augmentation is the only difference, so the first losses differ
    first = {p: read_metrics(run_dir / p)[0]["loss"] for p in policies}
    assert first["none"] != first["style"] and first["none"] != first["traditional"]


def _binomial_tail(n: int, k: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): how likely a chance-level classifier gets k of n right."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.slow
def test_classification_learns_above_chance(tmp_path):
    """300 steps from scratch on the train domains: the validation top-1 must be far above chance (1 in 6)."""
    root = build_synthetic(tmp_path / "data", image_size=32, samples_per_shard=64, train=384, val=128, test=64)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", "--config", "configs/finetune/classification_synthetic.yaml",
         f"run.dir={run_dir}", f"task.root={root}", "task.style_checkpoint=null", "model.vision.name=test_resnet",
         "data.image_size=32", "model.image_size=32", "data.batch_size=16", "data.num_workers=0",
         "train.max_steps=300", "train.warmup_steps=2", "train.lr=2e-3", "train.log_every=100",
         "train.checkpoint_every=0", "eval.every=300"],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = json.loads((run_dir / "results.json").read_text())["splits"]["val_best"]
    n = int(val["num_images"])
    correct = round(val["top1"] * n / 100.0)
    assert val["chance"] == pytest.approx(100.0 / 6) and n > 60
    # measured: 36 of 91 (39.6%); a chance-level model gets that many with probability ~2e-7
    assert _binomial_tail(n, correct, 1.0 / 6.0) < 1e-4, (correct, n)
