"""Weakly-supervised grounding: IoU and box scoring against hand computations, Grad-CAM on a constructed case whose
answer is known, the safe refs-pickle converter (benign Python-2 protocol-2 fixture, malicious fixtures refused
without running), the RefCOCO / detection / synthetic readers, and end-to-end runs of all four models."""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO, build_synthetic, subprocess_env

from data_prep.refs import UnsafePickleError, convert_refs, safe_load, scan_opcodes, validate_refs
from data_prep.refs import main as convert_main
from finetune.boxes import best_box, box_scores, gradcam_map, iou, normalized_to_pixels, upsample_map
from finetune.tasks.grounding import grounding_metrics, read_detections, read_refcoco, read_synthetic
from launch.dist import free_port


# ------------------------------------------------------------------------------------------------- boxes
def test_iou_by_hand_including_the_refcoco_pixel_convention():
    # 10x10 at the origin vs 10x10 at (5, 5): inclusive spans 5..9 -> 5 x 5 = 25; union 100 + 100 - 25 = 175
    assert iou([0, 0, 10, 10], [5, 5, 10, 10]) == pytest.approx(25 / 175)
    assert iou([0, 0, 10, 10], [5, 5, 10, 10], inclusive=False) == pytest.approx(25 / 175)
    assert iou([3, 4, 7, 2], [3, 4, 7, 2]) == pytest.approx(1.0)
    # sharing one pixel column (x = 9): computeIoU's strict "<" counts no intersection; continuous IoU 10 / 190
    assert iou([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
    assert iou([0, 0, 10, 10], [9, 0, 10, 10], inclusive=False) == pytest.approx(10 / 190)
    # two columns shared: inclusive 2 x 10 = 20, union 180
    assert iou([0, 0, 10, 10], [8, 0, 10, 10]) == pytest.approx(20 / 180)
    assert iou([0, 0, 4, 4], [10, 10, 4, 4]) == 0.0
    # the 0.5 threshold: 10x10 vs 10x20 sharing the first 10 rows -> 100 / 200
    assert iou([0, 0, 10, 10], [0, 0, 10, 20]) == pytest.approx(0.5)


def test_box_scores_are_mass_over_sqrt_area_and_the_best_is_reset_per_expression():
    heat = torch.zeros(10, 10)
    heat[2:4, 2:4] = 1.0  # mass 4 in a 2x2 patch
    proposals = [[2, 2, 2, 2], [0, 0, 10, 10], [2, 2, 4.9, 4.9], [6, 6, 3, 3]]
    scores = box_scores(heat, proposals)
    # 4/sqrt(4) = 2; 4/sqrt(100) = 0.4; truncated to 4x4: 4/sqrt(16) = 1; no mass: 0
    assert scores.tolist() == pytest.approx([2.0, 0.4, 1.0, 0.0])
    assert box_scores(heat, proposals, alpha=0.0).tolist() == pytest.approx([4.0, 4.0, 4.0, 0.0])  # total mass
    assert best_box(scores) == 0
    # a map negative everywhere (bicubic overshoot) still picks this expression's best box, not a stale one
    # scores -8/2, -104/10, -20/4, -9/3: the least negative is the last box
    assert best_box(box_scores(-1 - heat, proposals)) == 3
    assert best_box(torch.tensor([])) == -1
    assert normalized_to_pixels((0.25, 0.5, 0.75, 1.0), 40, 20) == [10.0, 10.0, 20.0, 10.0]


def test_gradcam_on_a_constructed_case_finds_the_patch_that_raises_the_score():
    """Text queries attend over 1 + 9 image tokens (a [CLS] and a 3x3 grid). The score is the attention output
    projected on c; only patch p's value points along c, so only attention to p raises the score: relu(dS/dA) is
    non-zero on p alone and Grad-CAM must put all mass there; the proposal box around p wins."""
    torch.manual_seed(0)
    heads, length, dim, p = 2, 4, 8, 5  # patch 5 = row 1, column 2 of the 3x3 grid
    q = torch.randn(1, heads, length, dim)
    k = torch.randn(1, heads, 10, dim)
    attention = torch.softmax(q @ k.transpose(-1, -2), dim=-1).requires_grad_(True)
    c = torch.randn(dim)
    values = -c.repeat(10, 1)
    values[1 + p] = c
    score = ((attention @ values) @ c).sum()
    grad = torch.autograd.grad(score, attention)[0]
    mask = torch.tensor([[1, 1, 1, 0]])  # the last text position is padding
    cam = gradcam_map(attention.detach(), grad, mask, (3, 3))
    assert cam.shape == (1, 3, 3)
    flat = cam.flatten()
    assert flat.argmax().item() == p and float(flat[p]) > 0 and torch.count_nonzero(flat).item() == 1
    # by hand: mean over heads and over all 4 text rows (padding contributes 0) of A[:, :, p] * |c|^2
    expected = (attention.detach()[0, :, :3, 1 + p] * c.dot(c)).sum() / (heads * length)
    assert float(flat[p]) == pytest.approx(float(expected), rel=1e-5)
    heat = upsample_map(cam[0], 30, 30)
    proposals = [[0, 0, 10, 10], [20, 10, 10, 10], [10, 20, 10, 10]]  # the second covers grid cell (1, 2)
    assert best_box(box_scores(heat, proposals)) == 1


# A ViT tower (patch grid) and a CNN tower (ConvTokens: the feature map's grid, 2x2 at 64 px, 3x3 at 96 px).
@pytest.mark.parametrize(
    ("vision", "size", "grid"),
    [({"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1, "patch_size": 8}}, 32, (4, 4)),
     ({"name": "efficientnet_lite0"}, 96, (3, 3))],
)  # fmt: skip
def test_albef_gradcam_runs_on_the_real_fusion_encoder_without_touching_parameter_grads(vision, size, grid):
    from finetune.tasks.grounding import fusion_gradcam
    from pretrain.models.albef import AlbefOptions, build
    from pretrain.models.encoders import TextOptions, VisionOptions

    torch.manual_seed(0)
    opts = AlbefOptions(vision=VisionOptions(**vision),
                        text=TextOptions(name="minilm", pretrained=False, config={"num_hidden_layers": 2}),
                        image_size=size, fusion_layer=1, embed_dim=16, queue_size=8)  # fmt: skip
    model = build(opts).eval()
    maps = fusion_gradcam(model, torch.randn(2, 3, size, size), ["a red circle", "the blue square"], layer=1)
    assert maps.shape == (2, *grid) and bool(torch.isfinite(maps).all()) and bool((maps >= 0).all())
    assert float(maps.sum()) > 0
    assert all(p.grad is None for p in model.parameters())
    assert model.text_encoder.attention_maps == {}  # saving switched off again


# ------------------------------------------------------------------------------------------------- refs pickle
REFS = [
    {"ref_id": 7, "ann_id": 100, "image_id": 1, "category_id": 1, "split": "train", "sent_ids": [70, 71],
     "file_name": "COCO_train2014_000000000001_100.jpg",
     "sentences": [{"sent_id": 70, "sent": "man in red", "raw": "Man in red.", "tokens": ["man", "in", "red"]},
                   {"sent_id": 71, "sent": "left guy", "raw": "left guy", "tokens": ["left", "guy"]}]},
    {"ref_id": 8, "ann_id": 101, "image_id": 1, "category_id": 3, "split": "testB", "sent_ids": [80],
     "sentences": [{"sent_id": 80, "sent": "caf\u00e9 table", "raw": "caf\u00e9 table", "tokens": ["table"]}]},
]  # fmt: skip


def _py2_pickle(obj) -> bytes:
    """A protocol-2 pickle as Python 2 writes it: ``str`` as SHORT_BINSTRING bytes (UTF-8 for non-ASCII text, which
    Python 2 stored undecoded), ints as BININT1/BININT, containers via MARK/SETITEMS/APPENDS."""
    out = io.BytesIO()
    out.write(b"\x80\x02")

    def emit(x):
        if isinstance(x, bool) or x is None:
            raise TypeError(x)
        if isinstance(x, int):
            out.write(b"K" + bytes([x]) if 0 <= x < 256 else b"J" + struct.pack("<i", x))
        elif isinstance(x, str):
            raw = x.encode("utf-8")
            out.write(b"U" + bytes([len(raw)]) + raw)
        elif isinstance(x, list):
            out.write(b"]")
            if x:
                out.write(b"(")
                for v in x:
                    emit(v)
                out.write(b"e")
        elif isinstance(x, dict):
            out.write(b"}")
            if x:
                out.write(b"(")
                for k, v in x.items():
                    emit(k)
                    emit(v)
                out.write(b"u")
        else:
            raise TypeError(type(x))

    emit(obj)
    out.write(b".")
    return out.getvalue()


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/SHOULD_NOT_EXIST"),))


def test_benign_python2_pickle_converts_to_json(tmp_path):
    data = _py2_pickle(REFS)
    assert "SHORT_BINSTRING" in scan_opcodes(data)
    assert safe_load(data) == REFS  # the ASCII attempt fails on "café"; latin-1 + repair gives the UTF-8 text
    src = tmp_path / "refs(unc).p"
    src.write_bytes(data)
    summary = convert_refs(src, tmp_path / "refs.json")
    assert summary == {"refs": 2, "expressions_per_split": {"train": 2, "testB": 1}, "out": str(tmp_path / "refs.json")}
    assert json.loads((tmp_path / "refs.json").read_text(encoding="utf-8")) == REFS
    # a plain Python-3 protocol-2 pickle of the same data is just as benign
    assert safe_load(pickle.dumps(REFS, protocol=2)) == REFS


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_malicious_pickles_are_refused_before_anything_runs(tmp_path, capsys, protocol):
    marker = Path("/tmp/SHOULD_NOT_EXIST")
    marker.unlink(missing_ok=True)
    payload = pickle.dumps([{"ref_id": 1, "x": _Boom()}], protocol=protocol)
    with pytest.raises(UnsafePickleError, match="GLOBAL|REDUCE"):
        scan_opcodes(payload)
    src = tmp_path / "evil.p"
    src.write_bytes(payload)
    assert convert_main(["--refs", str(src), "--out", str(tmp_path / "out.json")]) == 2
    assert "refusing" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out.json").exists()


def test_restricted_unpickler_refuses_globals_even_past_the_scan(monkeypatch):
    import data_prep.refs as refs

    monkeypatch.setattr(refs, "scan_opcodes", lambda data: [])  # second line of defence alone
    with pytest.raises(UnsafePickleError, match="global"):
        refs.safe_load(pickle.dumps(_Boom(), protocol=2))
    assert not Path("/tmp/SHOULD_NOT_EXIST").exists()


def test_schema_errors_name_the_ref_and_key():
    bad = json.loads(json.dumps(REFS))
    bad[1]["split"] = "testD"
    with pytest.raises(ValueError, match=r"refs\[1\]\.split"):
        validate_refs(bad)
    bad = json.loads(json.dumps(REFS))
    bad[0]["sentences"][1]["sent_id"] = "71"
    with pytest.raises(ValueError, match=r"refs\[0\]\.sentences\[1\]\.sent_id"):
        validate_refs(bad)
    with pytest.raises(ValueError, match="list of refs"):
        validate_refs({"not": "a list"})


# ------------------------------------------------------------------------------------------------- readers
def _refcoco(tmp_path: Path) -> tuple[Path, Path]:
    instances = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 40, "width": 60}],
        "annotations": [{"id": 100, "image_id": 1, "category_id": 1, "bbox": [1, 2, 10, 20]},
                        {"id": 101, "image_id": 1, "category_id": 3, "bbox": [30, 5, 20, 10]}],
        "categories": [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}],
    }  # fmt: skip
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "refs.json").write_text(json.dumps(REFS))
    return tmp_path / "instances.json", tmp_path / "refs.json"


def test_refcoco_reader_with_gold_boxes_and_both_detection_formats(tmp_path):
    inst, refs = _refcoco(tmp_path)
    rows, problems = read_refcoco(str(inst), str(refs), ["train"])
    assert problems == [] and [r.expression for r in rows] == ["man in red", "left guy"]
    assert rows[0].box == [1.0, 2.0, 10.0, 20.0] and rows[0].proposals == [[1, 2, 10, 20], [30, 5, 20, 10]]
    assert rows[0].image == "COCO_train2014_000000000001.jpg" and rows[0].split == "train"
    test, _ = read_refcoco(str(inst), str(refs), ["testA", "testB"])
    assert [(r.expression, r.split, r.box) for r in test] == [("café table", "testB", [30.0, 5.0, 20.0, 10.0])]
    mattnet = [{"det_id": 1, "h5_id": 1, "box": [0, 0, 5, 5], "image_id": 1, "category_id": 1, "score": 0.9},
               {"det_id": 2, "h5_id": 2, "box": [29, 5, 21, 10], "image_id": 1, "category_id": 3, "score": 0.8},
               {"det_id": 3, "box": [1, 1, 1, 1], "image_id": 2}]  # fmt: skip
    albef = {"1": [[0, 0, 5, 5, 0.9], [29, 5, 21, 10]], "2": [[1, 1, 1, 1]]}
    (tmp_path / "mattnet.json").write_text(json.dumps(mattnet))
    (tmp_path / "dets.json").write_text(json.dumps(albef))
    expected = {1: [[0.0, 0.0, 5.0, 5.0], [29.0, 5.0, 21.0, 10.0]], 2: [[1.0, 1.0, 1.0, 1.0]]}
    assert read_detections(str(tmp_path / "mattnet.json")) == expected == read_detections(str(tmp_path / "dets.json"))
    rows, _ = read_refcoco(str(inst), str(refs), ["testB"], dets=str(tmp_path / "dets.json"))
    assert rows[0].proposals == expected[1]


def test_metrics_accuracy_per_split_and_random_baseline():
    results = [(0, "testA", True, 0.5, 2), (1, "testA", False, 0.5, 2), (2, "testB", True, 1 / 3, 3)]
    m = grounding_metrics(results, failed=1, layer=3)
    assert m["accuracy"] == pytest.approx(200 / 3) and m["accuracy_testA"] == 50.0 and m["accuracy_testB"] == 100.0
    assert m["random_baseline"] == pytest.approx(100 * (0.5 + 0.5 + 1 / 3) / 3)
    assert m["skipped_images"] == 1 and m["mean_proposals"] == pytest.approx(7 / 3)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("grounding"), image_size=32, samples_per_shard=24, train=48,
                           val=12, test=12)  # fmt: skip


def test_synthetic_reader_gives_every_object_an_expression_and_gold_proposals(data):
    rows, problems = read_synthetic(str(data), "val")
    scenes = [json.loads(x)["scene"] for x in (data / "val_scenes.jsonl").read_text().splitlines()]
    assert problems == [] and len(rows) == sum(len(s["objects"]) for s in scenes)
    for r in rows:
        gt, props = r.pixel_boxes(32, 32)
        assert r.relative and sum(iou(p, gt) >= 0.5 for p in props) == 1  # objects never overlap: one right box
        assert r.image.startswith("val/") and r.expression.startswith("the ")


# ------------------------------------------------------------------------------------------------- end to end
DRIVER = textwrap.dedent(
    """
    import os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    from finetune.__main__ import main as finetune
    data, out = sys.argv[1], sys.argv[2]
    fusion = ["model.vision={name: vit_tiny_patch16_224, kwargs: {depth: 1, patch_size: 8}}",
              "model.text.config={num_hidden_layers: 2}", "model.text.pretrained=true", "model.fusion_layer=1",
              "model.embed_dim=32", "model.queue_size=32", "model.image_size=32"]
    tiny = {"albef": fusion, "tcl": fusion,
            "clip": ["model.vision={name: resnet10t, kwargs: {channels: [8, 16, 32, 64]}}",
                     "model.text.config={num_hidden_layers: 1}", "model.text.pretrained=true", "model.embed_dim=32",
                     "model.image_size=32"],
            "vilt": ["model.depth=2", "model.vision={name: vit_small_patch32_384, kwargs: {patch_size: 8}}",
                     "model.text.pretrained=true", "model.image_size=32"]}
    for name in sys.argv[4].split(","):
        assert finetune(["--config", f"configs/finetune/grounding_synthetic_{name}.yaml", "model.init=none",
                         *tiny[name], f"task.root={data}", "data.image_size=32", "data.batch_size=8",
                         "data.num_workers=0", "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=0",
                         "train.warmup_steps=1", "eval.every=2", "eval.qualitative=3",
                         f"run.dir={out}/{name}"]) == 0
    """
)


@pytest.mark.slow
def test_all_four_models_train_weakly_and_localise(data, tmp_path):
    models = ["albef", "tcl", "vilt", "clip"]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), str(data), str(tmp_path), str(free_port()), ",".join(models)],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    scenes = [json.loads(x)["scene"] for x in (data / "test_scenes.jsonl").read_text().splitlines()]
    n_expr = sum(len(s["objects"]) for s in scenes)
    for name in models:
        res = json.loads((tmp_path / name / "results.json").read_text())
        test = res["splits"]["test"]
        assert res["task"] == "grounding" and res["train"]["steps"] == 2
        assert test["num_expressions"] == n_expr and test["skipped_images"] == 0
        assert 0.0 <= test["accuracy"] <= 100.0
        # gold proposals: exactly one box per expression is right, so the random baseline is mean(1 / #objects)
        expected = 100 * sum(1 / len(s["objects"]) for s in scenes for _ in s["objects"]) / n_expr
        assert test["random_baseline"] == pytest.approx(expected)
        assert test["gradcam_layer"] == {"albef": 1, "tcl": 1, "vilt": 1, "clip": -1}[name]
        assert (tmp_path / name / "grounding_test.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(
    "recipe, task, lr, global_batch, extra",
    [
        ("nlvr2_albef", "nlvr2", 2e-5, 128, {"pairing": "paired", "distill": True, "alpha": 0.4}),
        ("nlvr2_tcl", "nlvr2", 2e-5, 128, {"pairing": "paired", "distill": True, "alpha": 0.4}),
        ("nlvr2_ta_albef", "nlvr2", 2e-5, 512, {"stage": "ta"}),
        ("nlvr2_vilt", "nlvr2", 1e-4, 128, {}),
        ("grounding_refcoco_albef", "grounding", 1e-5, 256, {"proposals": "dets", "gradcam_layer": 8}),
        ("grounding_refcoco_tcl", "grounding", 1e-5, 256, {"proposals": "dets", "gradcam_layer": 8}),
        ("grounding_refcoco_vilt", "grounding", 1e-4, 256, {"proposals": "dets", "vilt_layer": 6}),
    ],
)
def test_full_size_recipes_validate_with_published_hyper_parameters(recipe, task, lr, global_batch, extra):
    from finetune.config import FinetuneConfig
    from launch.config import load_config

    # bert-base-uncased is not on this machine: the text tower's name is checked offline, so stand in minilm
    cfg = load_config(FinetuneConfig, f"{REPO}/configs/finetune/{recipe}.yaml", ["model.text.name=minilm"],
                      check_paths=False)  # fmt: skip
    assert cfg.task.name == task and cfg.train.lr == pytest.approx(lr)
    assert cfg.data.batch_size * 8 == global_batch and not cfg.mixgen.enabled
    for key, value in extra.items():
        assert getattr(cfg.task, key) == value, key
    if cfg.model.name in ("albef", "tcl"):
        assert cfg.train.weight_decay == 0.02 and cfg.model.fusion_layer == 6
    else:
        assert cfg.train.weight_decay == 0.01
    # ALBEF's TA pre-step runs at the pretraining resolution; every fine-tuning stage at 384 (pos-embed resampled)
    size = 256 if recipe == "nlvr2_ta_albef" else 384
    assert cfg.model.image_size == cfg.data.image_size == size


@pytest.mark.parametrize("name", ["albef", "tcl", "vilt", "clip"])
def test_synthetic_recipes_validate(name):
    from finetune.config import FinetuneConfig
    from launch.config import load_config

    for task in ("nlvr2", "grounding"):
        cfg = load_config(FinetuneConfig, f"{REPO}/configs/finetune/{task}_synthetic_{name}.yaml", [],
                          check_paths=False)  # fmt: skip
        assert cfg.task.name == task and cfg.model.name == name and cfg.eval.metric == "accuracy"
