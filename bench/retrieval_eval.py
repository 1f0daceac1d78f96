"""Retrieval evaluation cost: throughput and memory of CLIP (cosine) and ALBEF (ITC top-k + ITM re-ranking).

Tiny random-weight models at 32 px (the cost does not depend on what the weights learned), N images x 5 captions,
features encoded once per N, then both directions scored as the evaluator does (``score_matrix``). Prints a table
and the ratio of each row's scoring time to its anchor (the same model and k at the smallest N): CLIP grows like
N^2 (one dot product per pair), ALBEF like N*k (fusion forwards) plus an N^2 ITC pre-filter.

    python bench/retrieval_eval.py [--sizes 100 200 400] [--ks 8 32] [--threads 1]
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

from finetune.tasks.retrieval import adapter_for, score_matrix  # noqa: E402
from pretrain.config import resolve_model_options  # noqa: E402
from pretrain.models import get  # noqa: E402

VISION = {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2, "patch_size": 8}}
TEXT = {"name": "minilm", "pretrained": False, "max_length": 30}
MODELS = {
    "clip": {"name": "clip", "vision": VISION, "text": {**TEXT, "config": {"num_hidden_layers": 2}},
             "embed_dim": 64, "image_size": 32},
    "albef": {"name": "albef", "vision": VISION, "text": {**TEXT, "config": {"num_hidden_layers": 4}},
              "fusion_layer": 2, "embed_dim": 64, "image_size": 32, "queue_size": 64},
}  # fmt: skip
WORDS = "red green blue yellow circle square star triangle small large left right top bottom on a the".split()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def build(name: str) -> torch.nn.Module:
    opts = resolve_model_options(MODELS[name])
    torch.manual_seed(0)
    model = get(name)[1](opts).eval()
    return model


def captions(n: int, g: torch.Generator) -> list[str]:
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (8,), generator=g).tolist()) for _ in range(n)]


@torch.no_grad()
def encode(adapter, n_img: int, batch: int = 64) -> tuple[dict, dict, float]:
    g = torch.Generator().manual_seed(n_img)
    images = torch.randn(n_img, 3, 32, 32, generator=g)
    texts = captions(5 * n_img, g)
    t0 = time.perf_counter()
    img = type(adapter).cat([adapter.image_features(images[s : s + batch]) for s in range(0, n_img, batch)])
    txt = type(adapter).cat([adapter.text_features(texts[s : s + batch]) for s in range(0, len(texts), batch)])
    return img, txt, time.perf_counter() - t0


@torch.no_grad()
def score(adapter, img: dict, txt: dict, k: int) -> float:
    t0 = time.perf_counter()
    i2t = score_matrix(adapter, img, txt, "i2t", k=k, rerank_batch=128)
    del i2t
    if adapter.kind == "fusion":
        t2i = score_matrix(adapter, img, txt, "t2i", k=k, rerank_batch=128)
        del t2i
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--ks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("clip", "albef"):
        adapter = adapter_for(build(name))
        anchors: dict[int, float] = {}
        for n in args.sizes:
            img, txt, enc_s = encode(adapter, n)
            for k in args.ks if name == "albef" else [0]:
                secs = score(adapter, img, txt, k)
                n_txt = 5 * n
                itc_pairs = n * n_txt
                itm_pairs = (n + n_txt) * min(k, n_txt) if name == "albef" else 0
                pairs = itm_pairs or itc_pairs
                anchors.setdefault(k, secs)
                rows.append((name, n, n_txt, k or "-", enc_s, secs, itc_pairs, itm_pairs, pairs / secs,
                             n * n_txt * 4 / 2**20, peak_rss_mb(), secs / anchors[k]))  # fmt: skip
                print(f"  done {name} N={n} k={k}", file=sys.stderr, flush=True)
    head = ("model", "N_img", "N_txt", "k", "encode_s", "score_s", "ITC_pairs", "ITM_pairs", "pairs/s",
            "matrix_MB", "peakRSS_MB", "x_anchor")  # fmt: skip
    print(" ".join(f"{h:>10}" for h in head))
    for r in rows:
        print(f"{r[0]:>10} {r[1]:>10} {r[2]:>10} {r[3]!s:>10} {r[4]:>10.2f} {r[5]:>10.3f} {r[6]:>10} {r[7]:>10} "
              f"{r[8]:>10.0f} {r[9]:>10.2f} {r[10]:>10.0f} {r[11]:>10.2f}")  # fmt: skip
    print(
        "pairs/s: ITC pairs per second for CLIP, ITM (fusion) pairs per second for ALBEF; x_anchor: scoring "
        "time relative to the same model and k at the smallest N; matrix_MB: one N_img x N_txt float32 matrix"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
