"""Evaluation metrics shared by fine-tuning tasks.

Retrieval ranks are computed with a *pessimistic* tie rule: a ground-truth item ranks behind every other item with
the same score. A model that scores everything equally therefore gets chance-level recall, never perfect recall,
and the result does not depend on the order of the test set.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _gt_ranks(scores: torch.Tensor, positives: Sequence[Sequence[int]]) -> torch.Tensor:
    """0-based rank of the best-ranked positive of each row (pessimistic ties)."""
    ranks = torch.empty(scores.shape[0], dtype=torch.long)
    for row, pos in enumerate(positives):
        if len(pos) == 0:
            raise ValueError(f"query {row} has no ground-truth item")
        s = scores[row]
        pos_t = torch.as_tensor(list(pos), dtype=torch.long)
        best = s[pos_t].max()
        # items strictly better than the best positive, plus equal-scoring non-positives ranked ahead of it
        higher = (s > best).sum()
        is_pos = torch.zeros_like(s, dtype=torch.bool)
        is_pos[pos_t] = True
        tied_others = ((s == best) & ~is_pos).sum()
        ranks[row] = higher + tied_others
    return ranks


def retrieval_recalls(
    sim_i2t: torch.Tensor,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    sim_t2i: torch.Tensor | None = None,
) -> dict[str, float]:
    """Image→text (TR@k) and text→image (IR@k) recall in percent, their means, RSUM and ``r_mean``.

    ``sim_i2t`` is ``[num_images, num_texts]``; ``sim_t2i`` defaults to its transpose (fusion models re-rank each
    direction separately and pass both). ``img2txt[i]`` lists the captions of image i; ``txt2img[t]`` its image.
    TR@k counts an image as hit when any of its captions is in the top k.
    """
    sim_i2t = sim_i2t.float().cpu()
    sim_t2i = sim_i2t.t() if sim_t2i is None else sim_t2i.float().cpu()
    if sim_i2t.shape != (len(img2txt), len(txt2img)) or sim_t2i.shape != (len(txt2img), len(img2txt)):
        raise ValueError(
            f"similarity shapes {tuple(sim_i2t.shape)}/{tuple(sim_t2i.shape)} do not match "
            f"{len(img2txt)} images and {len(txt2img)} texts"
        )
    tr = _gt_ranks(sim_i2t, img2txt)
    ir = _gt_ranks(sim_t2i, [[i] for i in txt2img])
    out: dict[str, float] = {}
    for k in ks:
        out[f"txt_r{k}"] = 100.0 * (tr < k).float().mean().item()
        out[f"img_r{k}"] = 100.0 * (ir < k).float().mean().item()
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["rsum"] = sum(out[f"txt_r{k}"] + out[f"img_r{k}"] for k in ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def chance_recalls(num_images: int, captions_per_image: int, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall of a random ranking (for reporting how far above chance a model is)."""
    num_texts = num_images * captions_per_image
    out: dict[str, float] = {}
    for k in ks:
        # TR@k: P(at least one of c positives among the top k of num_texts) under a random permutation
        miss = 1.0
        for j in range(captions_per_image):
            miss *= max(0.0, (num_texts - k - j) / (num_texts - j))
        out[f"txt_r{k}"] = 100.0 * (1.0 - miss)
        out[f"img_r{k}"] = 100.0 * min(1.0, k / num_images)
    out["rsum"] = sum(out[f"txt_r{k}"] + out[f"img_r{k}"] for k in ks)
    return out


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    if pred.numel() == 0:
        return 0.0
    return 100.0 * (pred.view(-1) == target.view(-1)).float().mean().item()
