"""VQA v2 fine-tuning and evaluation for CLIP, ViLT, ALBEF and TCL (task ``vqa``).

Data (:func:`read_vqa`, format detected from the file):

* the official release: ``v2_OpenEnded_mscoco_<subtype>_questions.json`` joined on ``question_id`` with
  ``v2_mscoco_<subtype>_annotations.json`` (``task.<split>_annotations``, or found beside the questions file by
  name; a test file has none). Images ``<subtype>/COCO_<subtype>_<image_id:012d>.jpg`` (test-dev2015 -> test2015);
* ALBEF's preprocessed lists (``vqa_train/val/test.json``, ``vg_qa.json``): ``{question_id?, question, answer: [10
  answers] | str | absent, image, dataset: "vqa"|"vg"}``;
* the synthetic set's ``{split}_scenes.jsonl``: questions derived per image by
  :func:`data_prep.sources.synthetic.vqa_questions` with a generator seeded by (``task.synthetic_seed``, split,
  image id); the single answer is repeated ten times, as a unanimous VQA question.

Images come from folders or from inside our shards (``<shard>.tar/<member>``), as in retrieval. A malformed row is
reported with its file and row and skipped. Questions are cleaned like ALBEF's ``pre_question``.

Answer vocabulary: ``task.answer_list`` (a JSON list, e.g. ALBEF's 3,128 answers), or derived from the training
questions: the normalised most frequent answer of each question, kept when it occurs >= ``task.min_answer_count``
times (ViLT: 9 -> 3,129 answers on VQA v2). The number of training questions with no answer in the vocabulary is
logged and returned in the metrics.

Heads (``task.head``; ``auto`` = ``decoder`` for ALBEF/TCL, ``classifier`` otherwise):

* ``classifier``: an MLP over the pair features (:mod:`finetune.pairs`) with one output per vocabulary answer,
  trained with ViLT's soft-score BCE (targets = each answer's VQA accuracy, 0/0.3/0.6/0.9/1.0; questions without an
  in-vocabulary answer are dropped from training, as ViLT does). ViLT's head is Linear(D, 2D)-LN-GELU-Linear; ALBEF/
  TCL use the same MLP on the fused [CLS] as a cheap alternative; for CLIP it is a late-fusion baseline.
* ``decoder`` (ALBEF/TCL only): ALBEF's generative answer decoder (:mod:`finetune.answer_decoder`), trained on each
  question's distinct normalised answers weighted by the share of annotators who gave them (VG answers weigh
  ``task.vg_weight``), and evaluated by ranking the vocabulary (first-token top ``eval.k_test``, then full
  likelihood; ``task.rank_score``).

ALBEF/TCL heads are trained with momentum distillation (:mod:`finetune.distill`; ``task.distill``, ``task.alpha``
ramped over the first epoch when ``task.alpha_warmup``). Evaluation reports the official VQA accuracy
(:mod:`finetune.vqa_metric`, ``task.metric_version``) overall and per answer type, and the accuracy of always
answering the most frequent training answer (``majority_acc``). ``report`` writes the EvalAI result file
(``vqa_<split>_result.json``: every question exactly once) and a PNG of a few questions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from finetune.answer_decoder import (
    answer_tokens,
    build_decoder,
    rank_answers,
    token_nll,
    token_soft_ce,
    weighted_answer_loss,
)
from finetune.data import scene_rows, usable_rows
from finetune.distill import Distiller, distilled_bce, has_momentum_encoders
from finetune.pairs import (
    HeadTask,
    ItemLoader,
    MLPHead,
    example_picks,
    feature_dim,
    fused_states,
    head_style,
    load_head_init,
    model_kind,
    pair_features,
    predict_items,
    results_table,
    spaced,
    write_examples,
)
from finetune.task_module import BackboneTask
from finetune.tasks import TaskOptions, register
from finetune.vqa_metric import answer_counts, most_common_answer, normalize_answer, soft_score, vqa_accuracy
from launch.config import ConfigError, exists_field

log = logging.getLogger("vlp.finetune.vqa")

HEAD = "vqa_head"  # the head lives on the backbone so the best-checkpoint export keeps it


@dataclasses.dataclass
class VqaOptions(TaskOptions):
    name: str = "vqa"
    train_json: str | None = exists_field(None)  # questions (any format of read_vqa)
    extra_train_json: tuple[str, ...] = exists_field(())  # more training files (ALBEF: vqa_val.json, vg_qa.json)
    val_json: str | None = exists_field(None)
    test_json: str | None = exists_field(None)
    train_annotations: str | None = exists_field(None)  # official annotations (default: found by file name)
    val_annotations: str | None = exists_field(None)
    test_annotations: str | None = exists_field(None)
    image_root: str | None = exists_field(None)
    answer_list: str | None = exists_field(None)  # JSON list of answers; default: derived from train
    min_answer_count: int = 9  # derived vocabulary: answers occurring at least this often (ViLT: 9)
    head: Literal["auto", "classifier", "decoder"] = "auto"
    max_words: int = 30  # ALBEF's pre_question: 30 words for training, eval_max_words for evaluation
    eval_max_words: int = 50
    distill: bool = True  # ALBEF/TCL: momentum distillation
    alpha: float = 0.4
    alpha_warmup: bool = True  # ramp alpha over the first epoch (ALBEF's VQA recipe)
    vg_weight: float = 0.5  # decoder: weight of a Visual Genome answer (ALBEF)
    rank_score: Literal["loglik", "albef"] = "loglik"  # albef: count the first token twice (see answer_decoder)
    answer_max_tokens: int = 16
    head_lr_mult: float = 1.0  # learning-rate multiplier of the new head (ViLT: 10)
    metric_version: Literal["official", "legacy"] = "official"
    synthetic_seed: int = 0  # seeds the question draw of the synthetic set
    eval_limit: int = 0  # evaluate this many evenly spaced items of val/test (0: all; quick CPU runs)

    def validate(self, recipe: Any) -> None:
        if self.min_answer_count < 1:
            raise ConfigError("task.min_answer_count: must be >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("task.alpha: must be in [0, 1]")
        if self.head_lr_mult <= 0:
            raise ConfigError("task.head_lr_mult: must be > 0")
        if not (self.val_json or self.test_json):
            raise ConfigError("task.val_json / task.test_json: at least one evaluation split is required")
        model = getattr(recipe, "model", None)
        if self.head == "decoder" and model is not None and model.name not in ("albef", "tcl"):
            raise ConfigError(f"task.head: the answer decoder needs ALBEF or TCL, not {model.name}")


# ============================================================================ data
@dataclasses.dataclass
class VqaItem:
    """One question about one image; ``answers`` are the human answers (empty on a test split)."""

    question_id: Any
    image: str
    question: str
    answers: list[str]
    answer_type: str | None = None
    source: str = "vqa"  # "vg" for Visual Genome QA rows (decoder weight task.vg_weight)


_Q_DROP = re.compile(r"[,.'!?\"()*#:;~]")
_Q_SPACE = re.compile(r"[-/]")


def pre_question(text: str, max_words: int = 50) -> str:
    """ALBEF's question cleaning: lower-case, drop ``, . ' ! ? " ( ) * # : ; ~``, '-' and '/' to spaces, at most
    ``max_words`` words."""
    words = _Q_SPACE.sub(" ", _Q_DROP.sub("", text.lower())).split()
    return " ".join(words[:max_words] if max_words > 0 else words)


def synthetic_answer_type(answer: str) -> str:
    """VQA's answer types for the synthetic answers."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "number" if answer.isdigit() else "other"


def _official_annotations(questions_path: Path) -> Path | None:
    name = questions_path.name
    if "_questions" not in name or "OpenEnded_" not in name:
        return None
    guess = questions_path.with_name(name.replace("OpenEnded_", "").replace("_questions", "_annotations"))
    return guess if guess.is_file() else None


def _read_official(path: Path, data: dict, annotations: str | None, max_words: int,
                   problems: list[str]) -> list[VqaItem]:  # fmt: skip
    subtype = str(data.get("data_subtype") or "")
    folder = "test2015" if subtype.startswith("test") else subtype
    ann_path = Path(annotations) if annotations else _official_annotations(path)
    by_qid: dict[Any, dict] = {}
    if ann_path is not None:
        ann = json.loads(ann_path.read_text(encoding="utf-8"))
        for row, a in enumerate(ann.get("annotations", []) if isinstance(ann, dict) else []):
            if not isinstance(a, dict) or "question_id" not in a or not isinstance(a.get("answers"), list):
                problems.append(f"{ann_path}: annotations[{row}]: malformed (needs question_id, answers); skipped")
                continue
            by_qid[a["question_id"]] = a
    items = []
    for row, q in enumerate(data["questions"]):
        where = f"{path}: questions[{row}]"
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or "question_id" not in q:
            problems.append(f"{where}: malformed (needs question_id, question, image_id); skipped")
            continue
        if not isinstance(q.get("image_id"), int):
            problems.append(f"{where}: image_id is not an integer; skipped")
            continue
        answers: list[str] = []
        atype = None
        if ann_path is not None:
            a = by_qid.get(q["question_id"])
            if a is None:
                problems.append(f"{where}: question {q['question_id']} has no annotation; skipped")
                continue
            answers = [x["answer"] for x in a["answers"] if isinstance(x, dict) and isinstance(x.get("answer"), str)]
            atype = a.get("answer_type")
        text = pre_question(q["question"], max_words)
        if not text:
            problems.append(f"{where}: empty question; skipped")
            continue
        image = f"{folder}/COCO_{folder}_{q['image_id']:012d}.jpg"
        items.append(VqaItem(q["question_id"], image, text, answers, atype))
    return items


def _read_albef(path: Path, rows: list, max_words: int, problems: list[str]) -> list[VqaItem]:
    items = []
    for row, r in enumerate(rows):
        where = f"{path}: row {row}"
        if not isinstance(r, dict):
            problems.append(f"{where}: not an object; skipped")
            continue
        if not isinstance(r.get("image"), str) or not r["image"]:
            problems.append(f"{where}: missing or non-string 'image'; skipped")
            continue
        if not isinstance(r.get("question"), str):
            problems.append(f"{where}: missing or non-string 'question'; skipped")
            continue
        raw = r.get("answer")
        if raw is None:
            answers = []
        elif isinstance(raw, str):
            answers = [raw]
        elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
            answers = list(raw)
        else:
            problems.append(f"{where}: 'answer' is neither a string nor a list of strings; skipped")
            continue
        text = pre_question(r["question"], max_words)
        if not text:
            problems.append(f"{where}: empty question; skipped")
            continue
        source = "vg" if r.get("dataset") == "vg" else "vqa"
        qid = r.get("question_id", f"{path.stem}-{row}")
        items.append(VqaItem(qid, r["image"], text, answers, r.get("answer_type"), source))
    return items


def _read_synthetic(path: Path, split: str, seed: int, max_words: int, problems: list[str]) -> list[VqaItem]:
    from data_prep.sources.synthetic import vqa_questions

    items = []
    for scene, image, image_id in scene_rows(path, path.read_text(encoding="utf-8").splitlines(), problems):
        rng = random.Random(f"vqa/{seed}/{split}/{image_id}")
        for k, (question, answer) in enumerate(vqa_questions(scene, rng)):
            items.append(VqaItem(image_id * 1000 + k, image, pre_question(question, max_words), [answer] * 10,
                                 synthetic_answer_type(answer), "synthetic"))  # fmt: skip
    return items


def read_vqa(path: str | Path, split: str, *, annotations: str | None = None, max_words: int = 50,
             seed: int = 0) -> tuple[list[VqaItem], list[str]]:  # fmt: skip
    """(items, problems) of a VQA file in any supported format (see the module docstring)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"VQA file not found: {p}")
    problems: list[str] = []
    if p.suffix == ".jsonl":
        items = _read_synthetic(p, split, seed, max_words, problems)
    else:
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON ({exc})") from exc
        if isinstance(data, dict) and isinstance(data.get("questions"), list):
            items = _read_official(p, data, annotations, max_words, problems)
        elif isinstance(data, list):
            items = _read_albef(p, data, max_words, problems)
        else:
            raise ValueError(f"{p}: expected an official questions file ({{'questions': [...]}}) or a list of rows")
    return usable_rows(p, items, problems, "question", log)


# ============================================================================ answer vocabulary
class AnswerVocab:
    """A closed list of (normalised) answers and their indices."""

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(dict.fromkeys(answers))
        if not self.answers:
            raise ValueError("the answer vocabulary is empty")
        self.index = {a: i for i, a in enumerate(self.answers)}

    def __len__(self) -> int:
        return len(self.answers)

    @classmethod
    def from_file(cls, path: str | Path) -> AnswerVocab:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise ValueError(f"{path}: an answer list must be a JSON list of strings")
        return cls([a for a in data if a.strip()])

    @classmethod
    def derive(cls, items: Sequence[VqaItem], min_count: int = 9) -> AnswerVocab:
        """The normalised most frequent answer of each question, kept when it occurs ``min_count`` times (most
        frequent first, ties alphabetical)."""
        counts = Counter(most_common_answer(it.answers) for it in items if it.answers)
        kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
        if not kept:
            raise ValueError(f"no answer occurs {min_count} times in training; lower task.min_answer_count")
        return cls(kept)

    def targets(self, answers: Sequence[str]) -> dict[int, float]:
        """Soft classifier targets: each in-vocabulary answer's VQA accuracy (a single-answer row scores 1)."""
        counts = answer_counts(answers)
        total = len(answers)
        out = {}
        for a, c in counts.items():
            if a in self.index:
                out[self.index[a]] = soft_score(c, total) if total >= 4 else c / total
        return out

    def uncovered(self, items: Sequence[VqaItem]) -> int:
        """Questions with answers none of which is in the vocabulary."""
        return sum(1 for it in items if it.answers and not any(normalize_answer(a) in self.index for a in it.answers))


def decoder_answers(item: VqaItem, vg_weight: float) -> tuple[list[str], list[float]]:
    """Distinct normalised answers and their weights: the share of annotators (ALBEF's count / 10), VG: vg_weight."""
    counts = answer_counts(item.answers)
    counts.pop("", None)
    if item.source == "vg":
        return list(counts), [vg_weight] * len(counts)
    total = len(item.answers)
    return list(counts), [c / total for c in counts.values()]


# ============================================================================ training module
def resolve_head(head: str, backbone: nn.Module) -> str:
    if head == "auto":
        return "decoder" if model_kind(backbone) == "fusion" else "classifier"
    if head == "decoder" and model_kind(backbone) != "fusion":
        raise ConfigError(f"task.head: the answer decoder needs ALBEF/TCL, not {type(backbone).__name__}")
    return head


def attach_head(backbone: nn.Module, head: str, num_answers: int) -> list[str]:
    """Create the head on the backbone (decoder: initialised from the fusion layers); returns keys left at init."""
    if head == "decoder":
        decoder, fresh = build_decoder(backbone)
        setattr(backbone, HEAD, decoder)
        return fresh
    setattr(backbone, HEAD, MLPHead(feature_dim(backbone), num_answers, head_style(backbone)))
    return []


class VqaModel(BackboneTask):
    """The training module: the backbone (carrying the head as ``vqa_head``) and, for ALBEF/TCL, the teacher."""

    def __init__(self, backbone: nn.Module, head: str, opts: VqaOptions) -> None:
        distiller = None
        if opts.distill and has_momentum_encoders(backbone):
            distiller = Distiller(backbone, [HEAD], momentum=backbone.opts.momentum, alpha=opts.alpha,
                                  warmup=opts.alpha_warmup)  # fmt: skip
        super().__init__(backbone, distiller)
        self.head = head
        self.opts = opts

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        alpha = self.distill_alpha(batch)
        if self.head == "decoder":
            loss = self._decoder_loss(batch, alpha)
        else:
            loss = self._classifier_loss(batch, alpha)
        return {"loss": loss, "losses": {"vqa": loss.detach()}, "alpha": alpha}

    def _classifier_loss(self, batch: dict[str, Any], alpha: float) -> torch.Tensor:
        bb = self.backbone
        logits = getattr(bb, HEAD)(pair_features(bb, batch["image"], batch["text"]))
        teacher = None
        if self.distiller is not None and alpha > 0:
            with torch.no_grad():
                feats_m = pair_features(bb, batch["image"], batch["text"], momentum=True)
                teacher = self.distiller.twin(HEAD)(feats_m)
        return distilled_bce(logits, batch["targets"], teacher, alpha)

    def _decoder_loss(self, batch: dict[str, Any], alpha: float) -> torch.Tensor:
        bb = self.backbone
        states, mask = fused_states(bb, batch["image"], batch["text"])
        rows = [q for q, answers in enumerate(batch["answers"]) for _ in answers]
        flat = [a for answers in batch["answers"] for a in answers]
        weights = torch.tensor([w for ws in batch["answer_weights"] for w in ws], device=states.device)
        ids, amask = answer_tokens(bb.tokenizer, flat, states.device, self.opts.answer_max_tokens)
        q = torch.tensor(rows, device=states.device)
        logits = getattr(bb, HEAD)(ids, amask, states[q], mask[q])
        per_answer = token_nll(logits, ids, amask)
        if self.distiller is not None and alpha > 0:
            with torch.no_grad():
                states_m, _ = fused_states(bb, batch["image"], batch["text"], momentum=True)
                logits_m = self.distiller.twin(HEAD)(ids, amask, states_m[q], mask[q])
            per_answer = (1.0 - alpha) * per_answer + alpha * token_soft_ce(logits, logits_m, amask)
        return weighted_answer_loss(per_answer, weights, len(batch["answers"]))


# ============================================================================ the task
@register("vqa", VqaOptions)
class VqaTask(HeadTask):
    """VQA fine-tuning and evaluation for the shared engine (see the module docstring)."""

    head_name = HEAD
    init_optional_keys = (HEAD + ".",)  # the head may be absent from model.init (a pretrain run)

    def __init__(self, cfg: Any, rank: int = 0, world: int = 1) -> None:
        super().__init__(cfg, rank, world)
        self._vocab: AnswerVocab | None = None
        self.train_info: dict[str, Any] = {}

    # -------------------------------------------------------------------- data
    def items(self, split: str) -> list[VqaItem]:
        if split not in self._items:
            path = self.json_of(split)
            if not path:
                raise ConfigError(f"task.{split}_json: not set, cannot use split {split!r}")
            words = self.opts.max_words if split == "train" else self.opts.eval_max_words
            ann = getattr(self.opts, f"{split}_annotations")
            seed = self.opts.synthetic_seed
            items, _ = read_vqa(path, split, annotations=ann, max_words=words, seed=seed)
            if split == "train":
                for extra in self.opts.extra_train_json:
                    items += read_vqa(extra, split, max_words=words, seed=seed)[0]
            else:
                items = spaced(items, self.opts.eval_limit)
            self._items[split] = items
        return self._items[split]

    def vocab(self) -> AnswerVocab:
        if self._vocab is None:
            if self.opts.answer_list:
                self._vocab = AnswerVocab.from_file(self.opts.answer_list)
            elif self.opts.train_json:
                self._vocab = AnswerVocab.derive(self.items("train"), self.opts.min_answer_count)
            else:
                raise ConfigError("task.answer_list: required without task.train_json (nothing to derive it from)")
            if self.opts.train_json:
                train = self.items("train")
                missing = self._vocab.uncovered(train)
                self.train_info = {"vocab_size": len(self._vocab), "train_questions": len(train),
                                   "train_uncovered": missing}  # fmt: skip
                if self.rank == 0:
                    log.info("answer vocabulary: %d answers; %d of %d training questions have no answer in it",
                             len(self._vocab), missing, len(train))  # fmt: skip
        return self._vocab

    def majority_answer(self) -> str | None:
        if not self.opts.train_json:
            return None
        counts = Counter(most_common_answer(it.answers) for it in self.items("train") if it.answers)
        return min(counts, key=lambda a: (-counts[a], a)) if counts else None

    # -------------------------------------------------------------------- training
    def build_model(self, backbone: nn.Module) -> VqaModel:
        head = resolve_head(self.opts.head, backbone)
        fresh = attach_head(backbone, head, len(self.vocab()))
        if fresh and self.rank == 0:
            log.warning("answer decoder: %d weights start from BERT's initialisation (image width != text width), "
                        "e.g. %s", len(fresh), fresh[:2])  # fmt: skip
        return VqaModel(backbone, head, self.opts)

    def train_loader(self) -> ItemLoader:
        vocab = self.vocab()
        items = self.items("train")
        head = self.opts.head
        if head == "auto":
            head = "decoder" if self.cfg.model.name in ("albef", "tcl") else "classifier"
        if head == "classifier":  # ViLT drops questions without an in-vocabulary answer from training
            items = [it for it in items if vocab.targets(it.answers)]
        else:
            items = [it for it in items if it.answers]
        opts = self.opts

        def extra(indices: list[int]) -> dict[str, Any]:
            batch_items = [items[i] for i in indices]
            out: dict[str, Any] = {"text": [it.question for it in batch_items]}
            if head == "classifier":
                targets = torch.zeros(len(indices), len(vocab))
                for row, it in enumerate(batch_items):
                    for j, s in vocab.targets(it.answers).items():
                        targets[row, j] = s
                out["targets"] = targets
            else:
                pairs = [decoder_answers(it, opts.vg_weight) for it in batch_items]
                out["answers"] = [a for a, _ in pairs]
                out["answer_weights"] = [w for _, w in pairs]
            return out

        d = self.cfg.data
        return ItemLoader([it.image for it in items], self.store, self.train_transform(), extra,
                          batch_size=d.batch_size, seed=self.cfg.run.seed, rank=self.rank, world=self.world,
                          num_workers=d.num_workers)  # fmt: skip

    # -------------------------------------------------------------------- evaluation
    def ensure_head(self, backbone: nn.Module) -> str:
        """The backbone's head kind; attaches one (loading its weights from ``model.init`` when they are there) for
        ``--eval-only`` of a fine-tuned run."""
        head = getattr(backbone, HEAD, None)
        if head is not None:
            return "decoder" if hasattr(head, "lm_head") else "classifier"
        kind = resolve_head(self.opts.head, backbone)
        attach_head(backbone, kind, len(self.vocab()))
        if load_head_init(backbone, HEAD, self.cfg.model.init) is False and self.rank == 0:
            log.warning("model.init has no %s weights: evaluating an untrained %s head", HEAD, kind)
        getattr(backbone, HEAD).to(next(backbone.parameters()).device)
        return kind

    def predictor(self, backbone: nn.Module, kind: str):
        """``predict(images, questions) -> answers`` for :func:`finetune.pairs.predict_items`."""
        vocab = self.vocab()
        head = getattr(backbone, HEAD)
        device = next(backbone.parameters()).device
        if kind == "classifier":

            def predict(images: torch.Tensor, texts: list[str]) -> list[str]:
                logits = head(pair_features(backbone, images.to(device), texts))
                return [vocab.answers[i] for i in logits.argmax(dim=1).tolist()]

            return predict
        cand_ids, cand_mask = answer_tokens(backbone.tokenizer, vocab.answers, device, self.opts.answer_max_tokens)

        def predict(images: torch.Tensor, texts: list[str]) -> list[str]:
            states, mask = fused_states(backbone, images.to(device), texts)

            def step(ids: torch.Tensor, amask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
                return head(ids, amask, states[rows], mask[rows])

            best, _ = rank_answers(step, len(texts), cand_ids, cand_mask, self.cfg.eval.k_test, self.opts.rank_score)
            return [vocab.answers[i] for i in best.tolist()]

        return predict

    @torch.no_grad()
    def evaluate(self, backbone: nn.Module, split: str) -> dict[str, Any]:
        items = self.items(split)
        kind = self.ensure_head(backbone)
        was = backbone.training
        backbone.eval()
        try:
            preds, problems = predict_items(
                [it.image for it in items], [it.question for it in items], self.store, self.eval_tf,
                self.predictor(backbone, kind), batch_size=self.cfg.eval.batch_size,
                num_workers=self.cfg.eval.num_workers, rank=self.rank, world=self.world,
            )  # fmt: skip
        finally:
            backbone.train(was)
        answers = ["" if p is None else p for p in preds]
        predictions = {it.question_id: a for it, a in zip(items, answers)}
        rows = [{"question_id": it.question_id, "answers": it.answers, "answer_type": it.answer_type} for it in items]
        version = self.opts.metric_version
        acc = vqa_accuracy(predictions, rows, version)
        metrics: dict[str, Any] = {"num_questions": len(items), "skipped_images": len(problems),
                                   "num_scored": acc["num_scored"]}  # fmt: skip
        if "overall" in acc:
            metrics["vqa_acc"] = acc["overall"]
            for name, value in acc.items():
                if name not in ("overall", "num_scored"):
                    metrics[f"acc_{name.replace('/', '_')}"] = value
            majority = self.majority_answer()
            if majority is not None:
                metrics["majority_acc"] = vqa_accuracy({it.question_id: majority for it in items}, rows,
                                                       version)["overall"]  # fmt: skip
        metrics["head"] = kind
        metrics.update(self.train_info)
        self.extras[split] = {"items": items, "answers": answers}
        return metrics

    def report(self, metrics: dict[str, Any], split: str, out_dir: str | Path) -> list[Path]:
        extras = self.extras.get(split)  # "val_best" (the kept checkpoint's numbers) has no predictions here
        if not extras:
            return []
        from launch.files import atomic_write_json

        out = Path(out_dir)
        items, answers = extras["items"], extras["answers"]
        result = out / f"vqa_{split}_result.json"
        atomic_write_json(result, [{"question_id": it.question_id, "answer": a} for it, a in zip(items, answers)])
        n = int(self.cfg.eval.qualitative)
        picks = example_picks(len(items), n)
        rows = []
        for i in picks:
            it = items[i]
            truth = most_common_answer(it.answers) if it.answers else "?"
            ok = None if not it.answers else answers[i] == truth
            rows.append({"image": it.image, "lines": [f"Q: {it.question}", f"predicted: {answers[i]}",
                                                      f"answer: {truth}"], "ok": ok})  # fmt: skip
        png = write_examples(out / f"vqa_{split}_examples.png", rows, self.store)
        return [result] + ([png] if png else [])

    def table(self, results: dict[str, dict[str, Any]]) -> str:
        return results_table(results, ["vqa_acc", "acc_yes_no", "acc_number", "acc_other", "majority_acc"])
