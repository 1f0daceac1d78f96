"""SNLI-VE: the readers of every published format (both image-id keys, never the premise), the synthetic
hypotheses, the distilled cross-entropy against a hand computation, the metrics and the baselines."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest
import torch

from finetune.distill import distilled_ce, soft_ce
from finetune.tasks.entailment import LABELS, EntailmentTask, VeItem, entailment_metrics, read_ve


def _snli_row(image_key: str, image: str, hypothesis: str, label: str) -> dict:
    return {"annotator_labels": [label], "captionID": "x", "gold_label": label, "pairID": f"{image}#0r1e",
            image_key: image, "sentence1": "A LEAKED PREMISE that names the answer.", "sentence1_parse": "",
            "sentence2": hypothesis, "sentence2_parse": ""}  # fmt: skip


def test_snli_ve_jsonl_both_id_keys_and_never_the_premise(tmp_path, caplog):
    rows = [
        _snli_row("Flikr30kID", "1000092795.jpg", "Two men are outside.", "entailment"),  # older files
        _snli_row("Flickr30K_ID", "1000092795", "Nobody is outside.", "contradiction"),  # current generator
        _snli_row("Flikr30kID", "36979.jpg", "A man sleeps.", "-"),  # no gold label: reported, skipped
        {"gold_label": "neutral", "sentence2": "no image"},  # reported, skipped
    ]
    path = tmp_path / "snli_ve_dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    items, problems = read_ve(path, "val")
    assert [(it.image, it.hypothesis, LABELS[it.label]) for it in items] == [
        ("1000092795.jpg", "two men are outside", "entailment"),
        ("1000092795.jpg", "nobody is outside", "contradiction"),
    ]
    assert not any("leaked" in it.hypothesis for it in items)
    assert len(problems) == 3 and "line 3" in problems[0] and "'-'" in problems[0]
    assert "line 4" in problems[1] and "line 5" in problems[2] and "line 5" in caplog.text


def test_albef_ve_json_rows(tmp_path):
    rows = [{"image": "1000092795", "sentence": "Two men outside.", "label": "neutral"},
            {"image": "flickr/2.png", "sentence": "x", "label": "entailment"},
            {"image": "3", "sentence": "y", "label": "maybe"}, {"sentence": "z", "label": "neutral"}]  # fmt: skip
    path = tmp_path / "ve_train.json"
    path.write_text(json.dumps(rows))
    items, problems = read_ve(path, "train")
    assert [(it.image, it.label) for it in items] == [("1000092795.jpg", 1), ("flickr/2.png", 2)]
    assert [p.split(": ")[1] for p in problems] == ["row 2", "row 3"]


def test_synthetic_hypotheses_are_derived_from_the_scenes(tmp_path):
    from data_prep.sources.synthetic import entailment, sample_scene, scene_to_dict

    lines = [json.dumps({"key": f"{i:09d}", "image_id": i, "shard": "train/00000.tar",
                         "scene": scene_to_dict(sample_scene(random.Random(i)))}) for i in range(3)]  # fmt: skip
    path = tmp_path / "train_scenes.jsonl"
    path.write_text("\n".join(lines))
    items, _ = read_ve(path, "train", seed=1)
    expected = entailment(sample_scene(random.Random(1)), random.Random("entailment/1/train/1"))
    mine = [(it.hypothesis, LABELS[it.label]) for it in items if it.image == "train/00000.tar/000000001.jpg"]
    assert mine == expected
    assert {it.label for it in items} == {0, 1, 2}


def test_distilled_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    teacher = torch.tensor([[1.0, 1.0, 1.0], [0.0, 3.0, 0.0]])

    def log_softmax(row):
        z = math.log(sum(math.exp(v) for v in row))
        return [v - z for v in row]

    ce = -(log_softmax([2.0, 0.0, -1.0])[0] + log_softmax([0.0, 1.0, 0.0])[2]) / 2
    t1 = [math.exp(v) / sum(math.exp(u) for u in [0.0, 3.0, 0.0]) for v in [0.0, 3.0, 0.0]]
    soft = -(sum(log_softmax([2.0, 0.0, -1.0])) / 3 + sum(p * q for p, q in zip(t1, log_softmax([0.0, 1.0, 0.0])))) / 2
    assert soft_ce(logits, teacher).item() == pytest.approx(soft, rel=1e-6)
    assert distilled_ce(logits, labels, teacher, 0.4).item() == pytest.approx(0.6 * ce + 0.4 * soft, rel=1e-6)
    assert distilled_ce(logits, labels, None, 0.4).item() == pytest.approx(ce, rel=1e-6)


def test_metrics_confusion_and_failed_images():
    labels = [0, 0, 1, 2, 2, 2]
    preds = [0, 1, 1, 2, 0, None]  # the last image failed: wrong, in no cell
    m = entailment_metrics(labels, preds)
    assert m["acc"] == pytest.approx(100 * 3 / 6)
    assert (
        m["acc_contradiction"] == 50.0 and m["acc_neutral"] == 100.0 and m["acc_entailment"] == pytest.approx(100 / 3)
    )
    assert m["conf_contradiction_neutral"] == 1 and m["conf_entailment_contradiction"] == 1
    assert sum(v for k, v in m.items() if k.startswith("conf_")) == 5


def test_hypothesis_only_and_majority_baselines():
    task = EntailmentTask.__new__(EntailmentTask)
    task.opts = SimpleNamespace(train_json="given")
    task._items = {"train": [VeItem("a", "there is a red circle", 2), VeItem("b", "there is a red circle", 2),
                             VeItem("c", "there is a red circle", 0), VeItem("d", "the circle is wood", 1),
                             VeItem("e", "the circle is wood", 0), VeItem("f", "x", 0)]}  # fmt: skip
    majority, per_text = task.baselines()
    assert majority == 0  # 3 contradictions vs 2 entailments, 1 neutral
    assert per_text == {"there is a red circle": 2, "the circle is wood": 0, "x": 0}  # ties: lowest label id
