"""VQA: the official metric and its normalisation on crafted cases (both published versions), the readers of every
published format, the answer vocabulary, each head's loss against a hand computation, the decoder's ranking on a
constructed case, the EvalAI file under 2-rank evaluation, and exact resume after SIGKILL under torchrun."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from finetune.answer_decoder import causal_mask, rank_answers, token_nll, token_soft_ce, weighted_answer_loss
from finetune.distill import distilled_bce, ramp, soft_bce
from finetune.tasks.vqa import AnswerVocab, VqaItem, decoder_answers, pre_question, read_vqa
from finetune.vqa_metric import (
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    soft_score,
    vqa_accuracy,
)


# ------------------------------------------------------------------------------------------ metric
@pytest.mark.parametrize("n, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)])
def test_accuracy_is_the_leave_one_out_average(n, expected):
    # n of 10 humans said "cat"; by hand: n=2 -> [2 * (1/3) + 8 * (2/3)] / 10 = 0.6; n=3 -> [3 * (2/3) + 7] / 10
    answers = ["cat"] * n + ["dog", "cow", "pig", "hen", "ant", "bee", "elk", "emu", "yak", "owl"][: 10 - n]
    assert question_accuracy("cat", answers) == pytest.approx(expected)
    assert soft_score(n) == pytest.approx(expected)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Yes.", "yes"),  # period not before a digit removed, lower-cased
        ("3.5", "3.5"),  # decimal point kept
        ("two", "2"),
        ("none", "0"),  # the official quirk
        ("a red ball", "red ball"),  # articles dropped
        ("dont", "don't"),  # contraction restored
        ("couldnt've", "couldn't've"),
        ("hi-fi", "hi fi"),  # '-' touching no space becomes a space
        ("left - right", "left right"),  # touching a space: deleted
        ("1,000", "1000"),  # digit-comma-digit: every listed character is deleted
        ("11:30", "11:30"),  # colon not in the list
        ("the  dog's\tbone ", "dog's bone"),
    ],
)
def test_official_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_punctuation_and_digit_steps_separately():
    assert process_punctuation("(red)") == " red "
    assert process_punctuation("red!") == "red "  # not touching a space: replaced by a space
    assert process_digit_article("An Apple") == "apple"


def test_unanimous_answers_where_the_two_versions_differ():
    unanimous = ["2"] * 10
    assert question_accuracy("two", unanimous, "official") == 0.0  # unanimous: nothing is normalised
    assert question_accuracy("two", unanimous, "legacy") == 1.0  # the prediction is always normalised
    assert question_accuracy("Yes.", ["yes"] * 10, "official") == 0.0
    assert question_accuracy("Yes.", ["yes"] * 10, "legacy") == 1.0
    assert question_accuracy(" 2\n", unanimous, "official") == 1.0  # whitespace is stripped in both
    # not unanimous: both versions normalise the prediction, so "two" matches the nine "2"s
    mixed = ["2"] * 9 + ["3"]
    assert question_accuracy("two", mixed, "official") == 1.0
    assert question_accuracy("two", mixed, "legacy") == 1.0
    # ... but only the official one normalises the answers' digits/articles ("a cat" vs "cat")
    cats = ["a cat"] * 3 + ["dog"] * 7
    assert question_accuracy("cat", cats, "official") == pytest.approx(0.9)
    assert question_accuracy("cat", cats, "legacy") == 0.0


def test_overall_and_per_type_accuracy_by_hand():
    questions = [
        {"question_id": 1, "answers": ["yes"] * 10, "answer_type": "yes/no"},  # right: 1
        {"question_id": 2, "answers": ["no"] * 10, "answer_type": "yes/no"},  # wrong: 0
        {"question_id": 3, "answers": ["2"] * 2 + ["3"] * 8, "answer_type": "number"},  # 2 of 10: 0.6
        {"question_id": 4, "answers": [], "answer_type": "other"},  # test question: not scored
    ]
    out = vqa_accuracy({1: "yes", 2: "yes", 3: "2", 4: "x"}, questions)
    assert out == {"num_scored": 3, "overall": round(100 * 1.6 / 3, 2), "number": 60.0, "yes/no": 50.0}
    with pytest.raises(KeyError, match="question 2"):
        vqa_accuracy({1: "yes"}, questions)


# ------------------------------------------------------------------------------------------ readers
def _official(tmp_path: Path) -> Path:
    questions = {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "questions": [
            {"image_id": 42, "question": "What color is the Bus?", "question_id": 42000},
            {"image_id": 42, "question": "How many dogs?", "question_id": 42001},
            {"image_id": "43", "question": "bad image id", "question_id": 43000},  # reported, skipped
            {"image_id": 44, "question": "no annotation", "question_id": 44000},  # reported, skipped
        ],
    }  # fmt: skip
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(["red"] * 10)]
    annotations = {"annotations": [
        {"question_id": 42000, "image_id": 42, "question_type": "what color is the", "answer_type": "other",
         "multiple_choice_answer": "red", "answers": answers},
        {"question_id": 42001, "image_id": 42, "question_type": "how many", "answer_type": "number",
         "multiple_choice_answer": "2", "answers": [{"answer": "2"}] * 6 + [{"answer": "3"}] * 4},
        {"image_id": 99},  # malformed: reported
    ]}  # fmt: skip
    q = tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"
    q.write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    return q


def test_official_files_are_joined_on_question_id(tmp_path, caplog):
    items, problems = read_vqa(_official(tmp_path), "val")
    assert [it.question_id for it in items] == [42000, 42001]
    first = items[0]
    assert first.image == "val2014/COCO_val2014_000000000042.jpg"
    assert first.question == "what color is the bus" and first.answers == ["red"] * 10
    assert first.answer_type == "other" and items[1].answers.count("2") == 6
    assert len(problems) == 3 and any("questions[2]" in p and "image_id" in p for p in problems)
    assert any("44000" in p and "no annotation" in p for p in problems)
    assert any("annotations[2]" in p for p in problems)
    assert "questions[3]" in caplog.text


def test_official_test_questions_without_annotations(tmp_path):
    q = tmp_path / "v2_OpenEnded_mscoco_test-dev2015_questions.json"
    q.write_text(json.dumps({"data_subtype": "test-dev2015", "questions": [
        {"image_id": 7, "question": "Is it?", "question_id": 7000}]}))  # fmt: skip
    (item,), _ = read_vqa(q, "test")
    assert item.answers == [] and item.image == "test2015/COCO_test2015_000000000007.jpg"


def test_albef_rows_vg_rows_test_rows_and_bad_rows(tmp_path):
    rows = [
        {"question_id": 5, "question": "What's on the table?", "answer": ["cup"] * 7 + ["mug"] * 3,
         "image": "train2014/a.jpg", "dataset": "vqa"},
        {"question": "where is the man", "answer": "beach", "image": "vg/1.jpg", "dataset": "vg"},
        {"question_id": 9, "question": "what?", "image": "test2015/b.jpg", "dataset": "vqa"},  # test: no answer
        {"question_id": 6, "question": "q", "answer": 3, "image": "x.jpg"},  # bad answer type
        {"question_id": 7, "answer": ["a"], "image": "x.jpg"},  # no question
        "not an object",
    ]  # fmt: skip
    path = tmp_path / "vqa_train.json"
    path.write_text(json.dumps(rows))
    items, problems = read_vqa(path, "train", max_words=30)
    assert [it.source for it in items] == ["vqa", "vg", "vqa"]
    assert items[0].question == "whats on the table"  # ALBEF's pre_question deletes the apostrophe
    assert items[1].answers == ["beach"] and items[1].question_id == "vqa_train-1"
    assert items[2].answers == []
    assert [p.split(": ", 1)[1][:5] for p in problems] == ["row 3", "row 4", "row 5"]
    assert decoder_answers(items[0], 0.5) == (["cup", "mug"], [0.7, 0.3])  # ALBEF: count / 10
    assert decoder_answers(items[1], 0.5) == (["beach"], [0.5])  # VG answers weigh 0.5


def test_synthetic_questions_are_derived_from_the_scenes(tmp_path):
    from data_prep.sources.synthetic import sample_scene, scene_to_dict, vqa_questions

    lines = []
    for i in range(3):
        scene = sample_scene(random.Random(i))
        lines.append(json.dumps({"key": f"{i:09d}", "image_id": i, "shard": "val/00000.tar",
                                 "scene": scene_to_dict(scene)}))  # fmt: skip
    lines.insert(1, json.dumps({"key": "x", "image_id": 9, "shard": "val/00000.tar", "scene": {"objects": 3}}))
    path = tmp_path / "val_scenes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items, problems = read_vqa(path, "val", seed=5)
    assert len(problems) == 1 and "line 2" in problems[0]
    expected = vqa_questions(sample_scene(random.Random(2)), random.Random("vqa/5/val/2"))
    mine = [it for it in items if it.image == "val/00000.tar/000000002.jpg"]
    assert [(it.question, it.answers[0]) for it in mine] == [(pre_question(q), a) for q, a in expected]
    assert all(it.answers == [it.answers[0]] * 10 for it in items)
    assert {it.answer_type for it in items} == {"yes/no", "number", "other"}
    assert len({it.question_id for it in items}) == len(items)
    again, _ = read_vqa(path, "val", seed=5)
    assert [it.question for it in again] == [it.question for it in items]  # reproducible draw


def test_vocabulary_derivation_coverage_and_soft_targets(tmp_path):
    items = [VqaItem(i, "x", "q", ["yes"] * 10) for i in range(3)]
    items += [VqaItem(10, "x", "q", ["Two"] * 6 + ["3"] * 4), VqaItem(11, "x", "q", ["2"] * 10)]
    items += [VqaItem(12, "x", "q", ["rare"] * 10), VqaItem(13, "x", "q", [])]
    vocab = AnswerVocab.derive(items, min_count=2)
    assert vocab.answers == ["yes", "2"]  # normalised ("Two" -> "2"), most frequent first; "rare" occurs once
    assert vocab.uncovered(items) == 1
    targets = vocab.targets(["Two"] * 6 + ["3"] * 4)
    assert targets == {1: 1.0}  # 6 of 10 -> 1.0; "3" has no class
    assert vocab.targets(["2"] * 2 + ["x"] * 8) == {1: pytest.approx(0.6)}
    path = tmp_path / "answer_list.json"
    path.write_text(json.dumps(["net", "", "cat"]))
    assert AnswerVocab.from_file(path).answers == ["net", "cat"]  # ALBEF's list minus the empty string


# ------------------------------------------------------------------------------------------ losses
def test_classifier_bce_and_distillation_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.5, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 0.3], [0.0, 0.6, 0.0]])

    def bce(x, t):
        return -(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))

    by_hand = sum(bce(float(x), float(t)) for x, t in zip(logits.flatten(), targets.flatten())) / 6 * 3
    assert soft_bce(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)
    teacher = torch.tensor([[0.0, 0.0, 0.0], [1.0, -1.0, 2.0]])
    soft = torch.sigmoid(teacher)
    by_hand_soft = sum(bce(float(x), float(t)) for x, t in zip(logits.flatten(), soft.flatten())) / 6 * 3
    mixed = distilled_bce(logits, targets, teacher, 0.4).item()
    assert mixed == pytest.approx(0.6 * by_hand + 0.4 * by_hand_soft, rel=1e-6)
    assert distilled_bce(logits, targets, teacher, 0.0).item() == pytest.approx(by_hand, rel=1e-6)
    assert ramp(0.4, {"step": 25, "updates_per_epoch": 100}, True) == pytest.approx(0.1)
    assert ramp(0.4, {"step": 25, "updates_per_epoch": 100}, False) == 0.4


def test_decoder_answer_loss_by_hand():
    # vocabulary of 3; two answers "[CLS]=0, 2, [SEP]=1" and "[CLS], 1" (shorter, padded)
    ids = torch.tensor([[0, 2, 1], [0, 1, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [5.0, 5.0, 5.0]],
                           [[3.0, 0.0, 0.0], [9.0, 9.0, 9.0], [0.0, 0.0, 0.0]]])  # fmt: skip

    def lp(row, tok):
        return row[tok] - math.log(sum(math.exp(v) for v in row))

    a0 = -(lp([0.0, 1.0, 2.0], 2) + lp([1.0, 0.0, 0.0], 1))  # [SEP] included, last position unused
    a1 = -lp([3.0, 0.0, 0.0], 1)  # the padded position does not count
    nll = token_nll(logits, ids, mask)
    assert nll.tolist() == pytest.approx([a0, a1], rel=1e-6)
    # weights are annotator shares (0.7, 0.3) of the same question; the batch has 2 questions
    assert weighted_answer_loss(nll, torch.tensor([0.7, 0.3]), 2).item() == pytest.approx((0.7 * a0 + 0.3 * a1) / 2)
    # a teacher equal to the student: the soft term is the entropy of the student's tokens
    ent = token_soft_ce(logits, logits, mask)
    p = torch.softmax(torch.tensor([3.0, 0.0, 0.0]), 0)
    assert ent[1].item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-6)


def test_causal_mask_sees_only_the_past_and_kept_tokens():
    m = causal_mask(torch.tensor([[1, 1, 0]]), torch.float32)[0, 0]
    assert (m == 0).tolist() == [[True, False, False], [True, True, False], [True, True, False]]


# ------------------------------------------------------------------------------------------ ranking
CLS, SEP, A, B, C = range(5)
# next-token distributions after each prefix: "a" is the likeliest first token, "b c" the likeliest answer
NEXT = {
    (CLS,): {A: 0.6, B: 0.25, C: 0.15},
    (CLS, A): {SEP: 0.3, C: 0.7},  # p("a") = 0.6 * 0.3 = 0.18
    (CLS, B): {C: 0.9, SEP: 0.1},
    (CLS, B, C): {SEP: 0.9, A: 0.1},  # p("b c") = 0.25 * 0.9 * 0.9 = 0.2025
    (CLS, C): {SEP: 1.0},  # p("c") = 0.15
}


def _table_logits(ids: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = torch.full((*ids.shape, 5), -1e9)
    for n in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            dist = NEXT.get(tuple(ids[n, : t + 1].tolist()), {})
            for tok, p in dist.items():
                out[n, t, tok] = math.log(p)
    return out


def test_ranking_picks_the_most_likely_answer_and_k_limits_the_candidates():
    cands = torch.tensor([[CLS, A, SEP, 0], [CLS, B, C, SEP], [CLS, C, SEP, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    best, score = rank_answers(_table_logits, 2, cands, mask, k=3)
    assert best.tolist() == [1, 1] and score[0].item() == pytest.approx(math.log(0.2025), rel=1e-5)
    # k = 1 keeps only the likeliest first token ("a"), whatever its full likelihood
    assert rank_answers(_table_logits, 1, cands, mask, k=1)[0].tolist() == [0]
    # ALBEF's double count of the first token: 0.18 * 0.6 beats 0.2025 * 0.25
    assert rank_answers(_table_logits, 1, cands, mask, k=3, score="albef")[0].tolist() == [0]


# ------------------------------------------------------------------------------------------ EvalAI file
def _predict_worker(rank: int, world: int, port: int, out: str) -> None:
    import os

    import torch.distributed as dist

    from finetune.data import ImageStore
    from finetune.pairs import predict_items

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(out)
    refs = [f"img{i}.png" if i != 4 else "missing.png" for i in range(7)]

    def predict(images: torch.Tensor, texts: list[str]) -> list[str]:
        return [f"{t}@{int(x[0, 0, 0])}" for x, t in zip(images, texts)]

    preds, problems = predict_items(refs, [f"q{i}" for i in range(7)], ImageStore(root), _pixel, predict,
                                    batch_size=2, rank=rank, world=world)  # fmt: skip
    (root / f"rank{rank}.json").write_text(json.dumps({"preds": preds, "problems": problems}))
    dist.destroy_process_group()


def _pixel(img) -> torch.Tensor:
    return torch.full((1, 1, 1), float(img.getpixel((0, 0))[0]))


def test_two_rank_prediction_covers_every_question_exactly_once(tmp_path):
    from PIL import Image

    from launch.dist import free_port

    for i in range(7):
        Image.new("RGB", (4, 4), (i * 10, 0, 0)).save(tmp_path / f"img{i}.png")
    mp.spawn(_predict_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # every rank holds the merged predictions
    assert r0["preds"] == [f"q{i}@{i * 10}" if i != 4 else None for i in range(7)]
    assert len(r0["problems"]) == 1 and "missing.png" in r0["problems"][0]


# ------------------------------------------------------------------------------------------ end to end + resume
TINY_ALBEF = {"model.vision.kwargs.depth": 1, "model.text.config.num_hidden_layers": 2, "model.fusion_layer": 1,
              "model.embed_dim": 32, "model.queue_size": 16}  # fmt: skip


def _vqa_recipe(tmp_path: Path, data: Path) -> Path:
    import yaml

    pre = yaml.safe_load(open("configs/pretrain/albef_tiny.yaml"))
    ft = yaml.safe_load(open("configs/finetune/vqa_synthetic.yaml"))
    ft["model"] = {**pre["model"], "init": "none"}
    ft["task"].update({f"{s}_json": f"{data}/{s}_scenes.jsonl" for s in ("train", "val", "test")})
    ft["task"]["image_root"] = str(data)
    path = tmp_path / "vqa.yaml"
    path.write_text(yaml.safe_dump(ft))
    return path


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    from helpers import build_synthetic

    return build_synthetic(tmp_path_factory.mktemp("vqa"), image_size=32, samples_per_shard=8, train=16, val=3, test=3)


@pytest.mark.slow
def test_decoder_resume_after_sigkill_matches_uninterrupted_run_and_evalai_file(vqa_data, tmp_path):
    """ALBEF's decoder head with momentum distillation on 2 ranks: a run SIGKILLed after step 3 and restarted
    (resuming from the step-2 checkpoint) logs the uninterrupted run's losses and ends with the same results."""
    from helpers import read_metrics, run_torchrun

    recipe = _vqa_recipe(tmp_path, vqa_data)
    args = ["-m", "finetune", "--config", str(recipe), "data.batch_size=4", "data.num_workers=0",
            "train.max_steps=4", "train.checkpoint_every=2", "train.log_every=1", "train.warmup_steps=1",
            "eval.every=100", "eval.k_test=10", "eval.qualitative=2", "task.min_answer_count=2",
            *[f"{k}={v}" for k, v in TINY_ALBEF.items()]]  # fmt: skip
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run_torchrun([*args, f"run.dir={full}"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    proc = run_torchrun([*args, f"run.dir={killed}"], timeout=900, VLP_KILL_AFTER_STEP="3")
    assert proc.returncode != 0 and not (killed / "results.json").exists()
    proc = run_torchrun([*args, f"run.dir={killed}"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    reference = {r["step"]: r for r in read_metrics(full)}
    again = {r["step"]: r for r in read_metrics(killed)}  # the restarted run's rows come last
    for step in (3, 4):
        assert again[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-6, rel=0), step
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, killed))
    assert a["splits"] == b["splits"]
    test = a["splits"]["test"]
    assert 0.0 <= test["vqa_acc"] <= 100.0 and test["num_scored"] == test["num_questions"] > 0
    assert "vqa_acc" in proc.stdout and "majority_acc" in proc.stdout
    # the EvalAI file: every test question exactly once, in the reader's order
    items, _ = read_vqa(vqa_data / "test_scenes.jsonl", "test")
    result = json.loads((full / "vqa_test_result.json").read_text())
    assert [r["question_id"] for r in result] == [it.question_id for it in items]
    assert all(isinstance(r["answer"], str) and r["answer"] for r in result)
    assert (full / "vqa_test_examples.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------ recipes
RECIPES = sorted(str(p) for p in Path("configs/finetune").glob("v[qe]*_*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_validate_and_never_flip(recipe):
    from finetune import tasks
    from finetune.config import FinetuneConfig
    from launch.config import load_config

    cfg = load_config(FinetuneConfig, recipe, check_paths=False)
    assert cfg.task.name == ("vqa" if "/vqa_" in recipe else "entailment")
    assert cfg.eval.metric == ("vqa_acc" if cfg.task.name == "vqa" else "acc") and not cfg.mixgen.enabled
    _, task_cls = tasks.get(cfg.task.name)
    transform = task_cls(cfg).train_transform()
    assert getattr(transform, "flip", False) is False  # questions and hypotheses name left/right


def test_recipe_set_is_complete():
    names = {Path(r).stem for r in RECIPES}
    for task in ("vqa", "ve"):
        assert {f"{task}_synthetic", f"{task}_albef", f"{task}_tcl", f"{task}_vilt"} <= names
        assert {f"{task}_synthetic_{m}" for m in ("tcl", "vilt", "clip")} <= names
