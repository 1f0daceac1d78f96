"""The VQA accuracy metric with the official answer normalisation.

Per question with human answers ``h_1..h_N`` (N = 10 in VQA v2) and a prediction ``p``::

    acc(p) = 1/N * sum_j min(1, #{i != j : h_i == p} / 3)

i.e. "min(#humans that said p / 3, 1)" averaged over the N leave-one-out subsets; with N = 10 and ``n`` humans
agreeing it is 0, 0.3, 0.6, 0.9, 1.0 for n = 0, 1, 2, 3, >= 4 (:func:`soft_score`). Overall accuracy is 100 x the
mean over questions (rounded to 2 decimals, as the official tool prints it), also per ``answer_type``.

Normalisation (:func:`normalize_answer`) follows the official evaluation as of its 2021 fix ("official"):

1. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it touches a space in the
   input or the input has a digit-comma-digit pattern, and replaced by a space otherwise; then a period not
   followed by a digit is removed (the official look-behind for "not preceded by a digit" is malformed and never
   acts; its ``re.UNICODE`` passed as the count caps this at 32 removals; both kept for identical scores);
   apostrophes and colons stay ("don't", "11:30");
2. digits/articles: lower-case, split on whitespace, ``none``/``zero``..``ten`` -> ``0``..``10``, drop ``a``/``an``/
   ``the``, restore apostrophes of contractions ("dont" -> "don't"), join with single spaces.

The two published versions differ on questions whose N answers are all identical (``version``):

* ``official`` (current official code): answers and prediction are only stripped of whitespace then, neither is
  normalised; otherwise both go through both steps. Unanimous "2" vs prediction "two" scores 0.
* ``legacy`` (the pre-2021 copy in ALBEF/TCL/LAVIS): the prediction always goes through both steps, the answers
  through the punctuation step only when they are not unanimous. Unanimous "2" vs "two" scores 1.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

Version = Literal["official", "legacy"]

PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")  # fmt: skip
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the malformed look-behind of the official code (see docstring)

# English contractions as written with apostrophes; any form missing some or all apostrophes is mapped back.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's should've shouldn't
shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's
something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've
who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll
y'all'd've you'd you'd've you'll you're you've""".split()


def _contraction_table(words: Iterable[str]) -> dict[str, str]:
    table: dict[str, str] = {}
    for word in words:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for r in range(1, len(cuts) + 1):
            for drop in itertools.combinations(cuts, r):
                variant = "".join(ch for i, ch in enumerate(word) if i not in drop)
                table.setdefault(variant, word)
    return table


CONTRACTIONS = _contraction_table(_CONTRACTED)


def process_punctuation(text: str) -> str:
    """Step 1 of the normalisation (see the module docstring)."""
    out = text
    digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=32)


def process_digit_article(text: str) -> str:
    """Step 2 of the normalisation (see the module docstring)."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _strip(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Both normalisation steps (what a non-unanimous question applies to answers and prediction)."""
    return process_digit_article(process_punctuation(_strip(text)))


def question_accuracy(prediction: str, answers: Sequence[str], version: Version = "official") -> float:
    """VQA accuracy in [0, 1] of ``prediction`` against the human ``answers`` of one question."""
    if not answers:
        raise ValueError("question_accuracy: a question needs at least one human answer")
    gts = [_strip(a) for a in answers]
    pred = _strip(prediction)
    unanimous = len(set(gts)) == 1
    if version == "official":
        if not unanimous:
            gts = [normalize_answer(a) for a in gts]
            pred = normalize_answer(pred)
    elif version == "legacy":
        if not unanimous:
            gts = [process_punctuation(a) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    else:
        raise ValueError(f"version must be 'official' or 'legacy', got {version!r}")
    n = len(gts)
    matches = sum(g == pred for g in gts)
    # leave-one-out: a matching annotator left out leaves matches - 1 agreeing, another one leaves matches
    total = matches * min(1.0, (matches - 1) / 3) + (n - matches) * min(1.0, matches / 3)
    return total / n


def soft_score(count: int, total: int = 10) -> float:
    """VQA accuracy of an answer given by ``count`` of ``total`` humans (0/0.3/0.6/0.9/1.0 for 10); ViLT's target."""
    if count <= 0:
        return 0.0
    return (count * min(1.0, (count - 1) / 3) + (total - count) * min(1.0, count / 3)) / total


def answer_counts(answers: Sequence[str]) -> Counter:
    """Counts of the normalised human answers of a question (what a classifier's soft targets are built from)."""
    return Counter(normalize_answer(a) for a in answers)


def most_common_answer(answers: Sequence[str]) -> str:
    """The most frequent normalised answer (first seen wins a tie): VQA's ``multiple_choice_answer``."""
    counts = answer_counts(answers)
    best = max(counts.values())
    return next(a for a in (normalize_answer(x) for x in answers) if counts[a] == best)


def vqa_accuracy(
    predictions: Mapping[Any, str],
    questions: Sequence[Mapping[str, Any]],
    version: Version = "official",
) -> dict[str, Any]:
    """Overall and per-answer-type accuracy (percent, 2 decimals) of ``predictions`` (question id -> answer).

    ``questions``: dicts with ``question_id``, ``answers`` (the human answers) and optionally ``answer_type``.
    Questions without answers (a test split) are not scored; a scored question without a prediction raises.
    """
    per_type: dict[str, list[float]] = defaultdict(list)
    scores: list[float] = []
    for q in questions:
        answers = q.get("answers") or []
        if not answers:
            continue
        qid = q["question_id"]
        if qid not in predictions:
            raise KeyError(f"no prediction for question {qid!r}")
        acc = question_accuracy(predictions[qid], answers, version)
        scores.append(acc)
        if q.get("answer_type"):
            per_type[str(q["answer_type"])].append(acc)
    out: dict[str, Any] = {"num_scored": len(scores)}
    if scores:
        out["overall"] = round(100.0 * sum(scores) / len(scores), 2)
    for name, values in sorted(per_type.items()):
        out[name] = round(100.0 * sum(values) / len(values), 2)
    return out
