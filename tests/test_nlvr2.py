"""NLVR2: the readers (official JSON lines, ALBEF json, synthetic pairs; a JPEG named .png), the paired-fusion
surgery (weights copied, key/value tied, routing), the official consistency metric by hand, the swap augmentation,
the text-assignment draw, and end-to-end fine-tuning of all four models with an exact-resume check."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import REPO, build_synthetic, read_metrics, subprocess_env
from PIL import Image

from finetune.data import ImageStore
from finetune.tasks.nlvr2 import (
    PairLoader,
    PairRow,
    consistency_key,
    nlvr2_metrics,
    read_nlvr2,
    swap_sides,
    ta_assignments,
)
from launch.dist import free_port


# ------------------------------------------------------------------------------------------------- readers
def _official(tmp_path: Path) -> Path:
    lines = [
        {"identifier": "dev-850-0-0", "sentence": "The left image has two dogs.", "label": "True", "writer": "w"},
        {"identifier": "dev-850-1-0", "sentence": "The left image has two dogs.", "label": "False"},
        "this line is not json",
        {"identifier": "dev-850-2-1", "sentence": "A cat.", "label": "maybe"},  # bad label
        {"identifier": "train-3-2-1", "sentence": "A bird.", "label": "false", "directory": 17},
    ]
    path = tmp_path / "dev.json"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_official_json_lines_reader_names_images_and_reports_bad_lines(tmp_path):
    rows, problems = read_nlvr2(str(_official(tmp_path)), "val")
    assert [(r.left, r.right, r.label, r.identifier) for r in rows] == [
        ("dev-850-0-img0.png", "dev-850-0-img1.png", 1, "dev-850-0-0"),
        ("dev-850-1-img0.png", "dev-850-1-img1.png", 0, "dev-850-1-0"),
        ("17/train-3-2-img0.png", "17/train-3-2-img1.png", 0, "train-3-2-1"),
    ]
    assert rows[0].sentence == "the left image has two dogs"  # pre_caption
    assert len(problems) == 2 and ":3:" in problems[0] and ":4:" in problems[1]


def test_albef_json_reader(tmp_path):
    path = tmp_path / "nlvr_dev.json"
    rows = [
        {"images": ["dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png"], "sentence": "Two dogs.", "label": "True"},
        {"images": ["dev/dev-1-1-img0.png", "dev/dev-1-1-img1.png"], "sentence": "Two dogs.", "label": "False"},
        {"images": ["only-one.png"], "sentence": "x", "label": "True"},
    ]
    path.write_text(json.dumps(rows))
    got, problems = read_nlvr2(str(path), "val")
    assert [(r.left, r.right, r.label) for r in got] == [
        ("dev/dev-1-0-img0.png", "dev/dev-1-0-img1.png", 1),
        ("dev/dev-1-1-img0.png", "dev/dev-1-1-img1.png", 0),
    ]
    assert len(problems) == 1 and "row 2" in problems[0]
    # the identifier is rebuilt so that one sentence over two pairs of a set is one consistency group
    assert consistency_key(got[0].identifier) == consistency_key(got[1].identifier)


def test_jpeg_named_png_decodes_by_content(tmp_path):
    Image.new("RGB", (8, 6), (200, 10, 10)).save(tmp_path / "dev-1-0-img0.png", format="JPEG")
    Image.new("RGB", (8, 6), (10, 10, 200)).save(tmp_path / "dev-1-0-img1.png", format="PNG")
    store = ImageStore(tmp_path)
    left, right = store.open("dev-1-0-img0.png"), store.open("dev-1-0-img1.png")
    assert left.size == right.size == (8, 6)
    assert left.getpixel((4, 3))[0] > 150 and right.getpixel((4, 3))[2] > 150


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return build_synthetic(tmp_path_factory.mktemp("nlvr2"), image_size=32, samples_per_shard=24, train=48, val=12,
                           test=12)  # fmt: skip


def test_synthetic_pairs_are_deterministic_balanced_and_grouped(data):
    rows, problems = read_nlvr2(str(data / "val_scenes.jsonl"), "val", pairs=2, statements=4, seed=0)
    again, _ = read_nlvr2(str(data / "val_scenes.jsonl"), "val", pairs=2, statements=4, seed=0)
    assert problems == [] and rows == again
    assert len(rows) == 12 * 2 * 4  # 12 left images x 2 partners x 4 statements (2 true, 2 false)
    assert sum(r.label for r in rows) == len(rows) // 2
    assert all(r.left != r.right and r.left.startswith("val/") and r.left.endswith(".jpg") for r in rows)
    # the label is the truth of the statement on that pair: recompute one from the scenes
    from data_prep.sources.synthetic import scene_from_dict

    scenes = {f"{s['shard']}/{s['key']}.jpg": scene_from_dict(s["scene"])
              for s in map(json.loads, (data / "val_scenes.jsonl").read_text().splitlines())}  # fmt: skip
    checked = 0
    for r in rows:
        if r.sentence.startswith(("the left image contains exactly", "the right image contains exactly")):
            n = ["zero", "one", "two", "three"].index(r.sentence.split()[5])
            scene = scenes[r.left if r.sentence.startswith("the left") else r.right]
            assert r.label == int(len(scene.objects) == n), r
            checked += 1
    assert checked > 0
    groups = {consistency_key(r.identifier) for r in rows}
    assert len(groups) < len(rows)  # some statements recur over the two pairs of a left image


# ------------------------------------------------------------------------------------------------- metric
def test_accuracy_and_official_consistency_by_hand():
    def row(ident: str, label: int) -> PairRow:
        return PairRow("l", "r", "s", label, ident)

    rows = [row("dev-1-0-0", 1), row("dev-1-1-0", 0), row("dev-1-2-0", 1),  # sentence A on three pairs
            row("dev-1-0-1", 0), row("dev-1-1-1", 0),  # sentence B on two pairs
            row("dev-2-0-0", 1)]  # fmt: skip  # sentence C (another set)
    preds = {0: 1, 1: 0, 2: 0, 3: 0, 4: 0, 5: 1}  # A wrong on pair 2; B, C all right
    m = nlvr2_metrics(rows, preds)
    assert m["accuracy"] == pytest.approx(100 * 5 / 6)
    assert m["consistency"] == pytest.approx(100 * 2 / 3)  # B and C consistent, A not
    assert m["num_sentences"] == 3 and m["skipped_pairs"] == 0
    assert m["chance"] == pytest.approx(50.0)
    # a row without prediction (unreadable image) is skipped, not counted right or wrong
    m = nlvr2_metrics(rows, {k: v for k, v in preds.items() if k != 2})
    assert m["accuracy"] == 100.0 and m["consistency"] == 100.0 and m["skipped_pairs"] == 1


def test_swap_sides_swaps_whole_words_only():
    assert swap_sides("the left image has more dogs than the right image") == (
        "the right image has more dogs than the left image")  # fmt: skip
    assert swap_sides("leftover rightmost") == "leftover rightmost"


def test_pair_loader_swap_is_seeded_by_row_and_swaps_images_with_words(tmp_path):
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    rows = [PairRow("a.png", "b.png", f"the left image is red {i}", 1, f"x-{i}-0-0") for i in range(8)]

    def tf(img, gen=None):
        return torch.tensor(img.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1)

    def batches(p):
        loader = PairLoader(rows, ImageStore(tmp_path), tf, batch_size=8, seed=3, rank=0, world=1, num_workers=0,
                            swap_prob=p)  # fmt: skip
        return next(iter(loader))

    plain, swapped = batches(0.0), batches(0.5)
    assert all(t.startswith("the left") for t in plain["text"]) and bool((plain["label"] == 1).all())
    flipped = [t.startswith("the right") for t in swapped["text"]]
    assert 0 < sum(flipped) < 8
    for b, f in enumerate(flipped):  # the red image moved to the right slot exactly where the words swapped
        assert float(swapped["image"][b, 1 if f else 0, 0]) == 255.0
    assert swapped["text"] == batches(0.5)["text"]  # same seed, same rows: same swaps


# ------------------------------------------------------------------------------------------------- surgery
def test_pair_fusion_layers_copies_weights_ties_key_value_and_routes_images():
    from transformers import BertConfig

    from pretrain.models.fusion import FusionBert, is_paired_state, pair_fusion_layers

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    bert = FusionBert(cfg, fusion_layer=2, encoder_width=8)
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    pair_fusion_layers(bert)
    layers = bert.encoder.layer
    assert len(layers) == 6 and is_paired_state(bert.state_dict(), "", 4)
    after = bert.state_dict()
    for k, v in before.items():
        parts = k.split(".")
        if parts[:2] == ["encoder", "layer"] and int(parts[2]) >= 2:
            j = int(parts[2]) - 2
            for copy in (2 + 2 * j, 3 + 2 * j):  # each pretrained fusion layer lands twice, unchanged
                assert torch.equal(after[".".join(parts[:2] + [str(copy)] + parts[3:])], v), (k, copy)
        else:
            assert torch.equal(after[k], v), k
    for a, b in ((2, 3), (4, 5)):
        ca, cb = layers[a].crossattention.self, layers[b].crossattention.self
        assert ca.key.weight is cb.key.weight and ca.value.weight is cb.value.weight  # one parameter
        assert ca.query.weight is not cb.query.weight
        assert layers[a].attention.self.query.weight is not layers[b].attention.self.query.weight
        assert layers[a].intermediate.dense.weight is not layers[b].intermediate.dense.weight
    with pytest.raises(ValueError, match="already paired"):
        pair_fusion_layers(bert)

    # routing: even fusion layers see the left image (3 tokens), odd ones the right (5 tokens)
    ids = torch.randint(5, 40, (2, 6))
    left, right = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    bert.set_save_attention(True)
    bert(ids, image_embeds=[left, right])
    assert {i: m.shape[-1] for i, m in bert.attention_maps.items()} == {2: 3, 3: 5, 4: 3, 5: 5}
    # one parameter, two uses: its gradient is the sum of what two untied copies would receive
    import copy

    bert.set_save_attention(False)
    untied = copy.deepcopy(bert)
    for a in (3, 5):
        cross = untied.encoder.layer[a].crossattention.self
        cross.key, cross.value = copy.deepcopy(cross.key), copy.deepcopy(cross.value)
    w = torch.randn(16)  # a random readout: the sum of a LayerNorm output has no gradient
    for model in (bert, untied):
        (model(ids, image_embeds=[left, right]) @ w).sum().backward()
    tied_grad = layers[2].crossattention.self.key.weight.grad
    parts = [untied.encoder.layer[a].crossattention.self.key.weight.grad for a in (2, 3)]
    assert float(parts[1].abs().sum()) > 0
    torch.testing.assert_close(tied_grad, parts[0] + parts[1], rtol=1e-4, atol=1e-7)


def test_text_assignment_draw_labels_match_positions():
    torch.manual_seed(0)
    sim = torch.randn(6, 6) * 3
    gen = torch.Generator().manual_seed(0)
    left, right, label = ta_assignments(sim, gen)
    own = torch.arange(6)
    assert bool(((label == 0) == (left == own)).all()) and bool(((label == 1) == (right == own)).all())
    two = label == 2
    assert bool((left[two] != own[two]).all() and (right[two] != own[two]).all() and (left[two] != right[two]).all())
    assert bool((left != right).all())
    big = ta_assignments(torch.zeros(60, 60), torch.Generator().manual_seed(1))[2]
    assert 0.5 < float((big < 2).float().mean()) < 0.85  # about 2/3 single-hard-negative rows


# ------------------------------------------------------------------------------------------------- end to end
DRIVER = textwrap.dedent(
    """
    import json, os, sys
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3])
    from finetune.__main__ import main as finetune
    data, out, models = sys.argv[1], sys.argv[2], sys.argv[4].split(",")
    fusion = ["model.vision={name: vit_tiny_patch16_224, kwargs: {depth: 1, patch_size: 8}}",
              "model.text.config={num_hidden_layers: 2}", "model.text.pretrained=true", "model.fusion_layer=1",
              "model.embed_dim=32", "model.queue_size=32", "model.image_size=32"]
    tiny = {"albef": fusion, "tcl": fusion,
            "clip": ["model.vision={name: resnet10t, kwargs: {channels: [8, 16, 32, 64]}}",
                     "model.text.config={num_hidden_layers: 1}", "model.text.pretrained=true", "model.embed_dim=32",
                     "model.image_size=32"],
            "vilt": ["model.depth=1", "model.vision={name: vit_small_patch32_384, kwargs: {patch_size: 8}}",
                     "model.text.pretrained=true", "model.image_size=32"]}
    tasks = [f"task.{s}_json={data}/{s}_scenes.jsonl" for s in ("train", "val", "test")] + [f"task.image_root={data}"]
    for name in models:
        args = ["--config", f"configs/finetune/nlvr2_synthetic_{name}.yaml", "model.init=none", *tiny[name], *tasks,
                "data.image_size=32", "data.batch_size=8", "data.num_workers=0", "train.log_every=1",
                "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.warmup_steps=1",
                "eval.every=2"]
        for run in sys.argv[5].split(","):
            steps = run.split(":")[1]
            assert finetune([*args, f"run.dir={out}/{name}_{run.split(':')[0]}", f"train.max_steps={steps}"]) == 0
    """
)


def _drive(data: Path, out: Path, models: list[str], runs: str) -> None:
    driver = out / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run(
        [sys.executable, str(driver), str(data), str(out), str(free_port()), ",".join(models), runs],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.mark.slow
def test_all_four_models_fine_tune_evaluate_and_write_official_predictions(data, tmp_path):
    models = ["albef", "tcl", "vilt", "clip"]
    _drive(data, tmp_path, models, "run:2")
    rows, _ = read_nlvr2(str(data / "test_scenes.jsonl"), "test")
    for name in models:
        run = tmp_path / f"{name}_run"
        res = json.loads((run / "results.json").read_text())
        test = res["splits"]["test"]
        assert res["task"] == "nlvr2" and res["train"]["steps"] == 2
        assert test["num_pairs"] == 12 * 2 * 4 and test["skipped_pairs"] == 0
        assert 0.0 <= test["accuracy"] <= 100.0 and 0.0 <= test["consistency"] <= 100.0
        assert res["splits"]["val_best"]["accuracy"] == res["best"]["value"]
        # the official predictions file reproduces the reported accuracy against the labels
        lines = [x.split(",") for x in (run / "nlvr2_test_predictions.csv").read_text().split()]
        truth = {r.identifier: r.label for r in rows}
        assert len(lines) == 96 and {i for i, _ in lines} == set(truth)
        hits = sum(int(label == "True") == truth[i] for i, label in lines)
        assert 100.0 * hits / 96 == pytest.approx(test["accuracy"])
        logged = read_metrics(run)
        assert "distill" in logged[-1] if name in ("albef", "tcl") else "distill" not in logged[-1]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(data, tmp_path):
    """ALBEF (paired encoder + momentum teacher): steps 3-4 after resuming from step 2 equal the uninterrupted
    run's, so the loader position, the teacher and the RNG are all restored."""
    _drive(data, tmp_path, ["albef"], "full:4")
    full, resumed = tmp_path / "albef_full", tmp_path / "albef_resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step4")
    (resumed / "checkpoints" / "latest").write_text("step2")
    metrics = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in map(json.loads, metrics)
                                                     if r["step"] <= 2) + "\n")  # fmt: skip
    _drive(data, tmp_path, ["albef"], "resumed:4")
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step2") and summary["steps_this_run"] == 2
    ref = {r["step"]: r for r in read_metrics(full)}
    again = {r["step"]: r for r in read_metrics(resumed)}
    for step in (3, 4):
        for key in ("loss", "ce", "distill"):
            assert again[step][key] == pytest.approx(ref[step][key], abs=1e-6, rel=0), (step, key)
    a = json.loads((full / "results.json").read_text())["splits"]["test"]
    b = json.loads((resumed / "results.json").read_text())["splits"]["test"]
    assert a == b
