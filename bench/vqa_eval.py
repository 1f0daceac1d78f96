"""VQA evaluation cost: ALBEF's answer-decoder ranking vs ``k_test``, against the classifier head.

A tiny random-weight ALBEF at 32 px (the cost does not depend on what the weights learned) answers Q questions
over an answer list of A answers (the synthetic set's answers padded with multi-word-piece fillers up to A, ALBEF's
list has 3,128). The decoder path is what evaluation runs (``VqaTask.predictor``): fused question states, one
decoder step from [CLS] over the whole vocabulary, then ``k`` candidates teacher-forced per question. The
classifier path is one MLP over the fused [CLS]. Prints a table; ×anchor = time per question relative to the
classifier head (anchor 1).

    python bench/vqa_eval.py [--questions 64] [--answers 3128] [--ks 1 8 32 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from data_prep.sources.synthetic import VQA_ANSWERS  # noqa: E402
from finetune.answer_decoder import answer_tokens, build_decoder, rank_answers  # noqa: E402
from finetune.pairs import MLPHead, feature_dim, fused_states  # noqa: E402
from pretrain.config import resolve_model_options  # noqa: E402
from pretrain.models import get  # noqa: E402

ALBEF = {"name": "albef", "vision": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2, "patch_size": 8}},
         "text": {"name": "minilm", "pretrained": False, "max_length": 30, "config": {"num_hidden_layers": 4}},
         "fusion_layer": 2, "embed_dim": 64, "image_size": 32, "queue_size": 64}  # fmt: skip
WORDS = "what colour is the how many circles are there where red square left of top".split()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def answer_list(n: int) -> list[str]:
    """The synthetic answers, then fillers ("answer 17 x") of 2-4 word pieces, ``n`` in all."""
    out = list(VQA_ANSWERS)
    i = 0
    while len(out) < n:
        out.append(f"answer {i} x" if i % 2 else f"answer{i}")
        i += 1
    return out[:n]


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--answers", type=int, default=3128)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--batch", type=int, default=16, help="questions per forward (ALBEF: 16 per GPU)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = get("albef")[1](resolve_model_options(ALBEF)).eval()
    decoder, _ = build_decoder(model)
    decoder.eval()
    classifier = MLPHead(feature_dim(model), args.answers, "albef").eval()
    answers = answer_list(args.answers)
    cand_ids, cand_mask = answer_tokens(model.tokenizer, answers)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.questions, 3, 32, 32, generator=g)
    questions = [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (7,), generator=g).tolist())
                 for _ in range(args.questions)]  # fmt: skip

    def run(k: int | None) -> float:
        start = time.perf_counter()
        for s in range(0, args.questions, args.batch):
            imgs, qs = images[s : s + args.batch], questions[s : s + args.batch]
            states, mask = fused_states(model, imgs, qs)
            if k is None:
                classifier(states[:, 0]).argmax(1)
                continue

            def step(ids, amask, rows, states=states, mask=mask):
                return decoder(ids, amask, states[rows], mask[rows])

            rank_answers(step, len(qs), cand_ids, cand_mask, k)
        return time.perf_counter() - start

    run(None)  # warm-up
    print(f"ALBEF tiny, {args.questions} questions, {args.answers} answers (max {cand_ids.shape[1]} tokens), "
          f"batch {args.batch}, {args.threads} thread(s)")  # fmt: skip
    print(f"{'head':<12}{'k_test':>8}{'seconds':>10}{'q/s':>10}{'xanchor':>10}", flush=True)
    anchor = None
    for head, k in [("classifier", None)] + [("decoder", k) for k in args.ks]:
        sec = run(k)
        anchor = anchor or sec
        label = "-" if k is None else str(k)
        print(f"{head:<12}{label:>8}{sec:>10.2f}{args.questions / sec:>10.1f}{sec / anchor:>10.1f}", flush=True)
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
