"""MixGen (Hao et al., WACV-W 2023) and the variants of the seed paper's Table 6, as pure functions.

MixGen runs per rank, on each freshly collated minibatch: images are normalized float tensors (mixing in
normalized space equals mixing pixels, because normalization is affine per channel and the weights sum to
one), texts are raw strings (tokenization happens afterwards, inside the model, so a concatenated caption is
re-tokenized and truncated there). Nothing here mutates its inputs.

Variants (pair = row ``i`` and partner ``j``; ``lam`` is the image weight of row ``i``):

* ``default`` (the paper): M = int(ratio*B) (at least 1 when B >= 2); rows ``i < M`` become
  ``lam*I_i + (1-lam)*I_{i+M}`` and ``T_i + " " + T_{i+M}``; rows ``>= M`` are unchanged.
* ``a``: as default, but ``lam ~ Beta(0.1, 0.1)`` drawn per pair.
* ``b``: image mixup with ``lam``; text is ``T_i`` or ``T_j``, chosen uniformly per pair.
* ``c``: text concatenation; image is ``I_i`` or ``I_j``, chosen uniformly per pair.
* ``d``: image mixup with ``lam ~ Beta(0.1, 0.1)``; text keeps ``round(lam*|T_i|)`` randomly chosen words of
  ``T_i`` then ``round((1-lam)*|T_j|)`` of ``T_j`` (order kept within each; see :func:`_mix_words`).
* ``e``: image mixup with ``lam ~ Beta(0.1, 0.1)``; text = words of ``T_i + T_j``, of which a random
  ``ceil(n/2)`` are kept in order.
* ``batch``: every row ``i`` mixed with ``perm[i]`` of a random permutation, from a snapshot of the batch
  (the official ``mixgen_batch`` overwrites rows in place and chains mixtures; this does not). Fixed points
  ``perm[i] == i`` are kept, as in the official code: the image is unchanged and the caption doubled.

Words are whitespace tokens. "round" is round-half-up (``floor(x + 0.5)``), not Python's banker's rounding.
All randomness comes from the ``torch.Generator`` passed in; :func:`mixgen_generator` derives one from
``(seed, step, rank)`` so that a resumed run mixes exactly as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

VARIANTS = ("default", "a", "b", "c", "d", "e", "batch")
BETA_ALPHA = 0.1  # Table 6's Beta(0.1, 0.1) for the sampled-lambda variants

Images = torch.Tensor | Sequence[torch.Tensor]


@dataclasses.dataclass
class MixInfo:
    """What was mixed: row ``rows[k]`` became a mixture of itself and ``partners[k]``.

    ``lam[k]`` is the image weight of the row (1 - lam[k] the partner's); ``text_source`` says per mixed row
    where its caption came from: ``"concat"``, ``"row"``, ``"partner"``, ``"words"`` (variant d) or
    ``"half"`` (variant e).
    """

    variant: str
    rows: torch.Tensor  # int64 [M]
    partners: torch.Tensor  # int64 [M]
    lam: torch.Tensor  # float64 [M]
    text_source: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "rows": self.rows,
            "partners": self.partners,
            "lam": self.lam,
            "text_source": list(self.text_source),
        }


def mixgen_generator(seed: int, step: int, rank: int, micro: int = 0) -> torch.Generator:
    """A CPU generator determined by ``(seed, step, rank, micro)`` only (stable across processes and versions).

    ``micro`` numbers the micro-batches of one optimizer step under gradient accumulation (0 without it), so
    they do not all repeat the same draws.
    """
    digest = hashlib.sha256(f"mixgen:{int(seed)}:{int(step)}:{int(rank)}:{int(micro)}".encode()).digest()
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int.from_bytes(digest[:8], "little") >> 1)  # 63 bits: inside manual_seed's range
    return gen


def sample_beta(alpha: float, beta: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` draws of Beta(alpha, beta), float64, using only ``generator`` (Jöhnk's algorithm).

    torch's Beta/Gamma distributions cannot take a generator, so this draws uniforms: with ``U, V ~ U(0,1]``,
    ``X = U^(1/alpha)``, ``Y = V^(1/beta)``, a pair with ``X + Y <= 1`` gives ``X / (X + Y) ~ Beta(alpha, beta)``.
    Computed in log space, since ``U^(1/0.1) = U^10`` underflows for small ``U``. The acceptance rate is
    ``Gamma(alpha+1) Gamma(beta+1) / Gamma(alpha+beta+1)`` (about 0.985 for 0.1, 0.1; 0.5 for 1, 1), so only
    ``alpha, beta <= 1`` are accepted here, where it stays efficient.
    """
    if not (0.0 < alpha <= 1.0 and 0.0 < beta <= 1.0):
        raise ValueError(f"sample_beta: alpha and beta must be in (0, 1], got {alpha}, {beta}")
    out = torch.empty(n, dtype=torch.float64)
    filled = 0
    while filled < n:
        need = n - filled
        # 1 - rand lies in (0, 1]: log never sees 0
        log_x = torch.log1p(-torch.rand(need, generator=generator, dtype=torch.float64)) / alpha
        log_y = torch.log1p(-torch.rand(need, generator=generator, dtype=torch.float64)) / beta
        log_s = torch.logaddexp(log_x, log_y)
        ok = log_s <= 0
        accepted = torch.exp(log_x[ok] - log_s[ok])
        out[filled : filled + accepted.numel()] = accepted
        filled += accepted.numel()
    return out


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _keep_words(words: list[str], count: int, generator: torch.Generator) -> list[str]:
    """``count`` words of ``words`` chosen at random without replacement, in their original order.

    One permutation of ``len(words)`` is drawn whenever ``words`` is non-empty, whatever ``count`` is, so the
    generator's sequence depends only on the texts.
    """
    if not words:
        return []
    order = torch.randperm(len(words), generator=generator)[: max(count, 0)]
    return [words[i] for i in sorted(order.tolist())]


def _mix_words(t_i: str, t_j: str, lam: float, generator: torch.Generator) -> str:
    """Variant d's caption: ``round(lam*|T_i|)`` words of ``T_i`` then ``round((1-lam)*|T_j|)`` of ``T_j``.

    Rule for short captions: if both counts round to zero while some text is non-empty, one word is taken
    from the text with the larger weight (``T_i`` when ``lam >= 0.5``), or from the other one when that is
    empty, so the caption is never empty unless both inputs are. Two permutations are always drawn (first
    for ``T_i``, then for ``T_j``, each of its length; none for an empty text) so the draws do not depend on
    the counts.
    """
    w_i, w_j = t_i.split(), t_j.split()
    n_i = min(len(w_i), _round_half_up(lam * len(w_i)))
    n_j = min(len(w_j), _round_half_up((1.0 - lam) * len(w_j)))
    if n_i + n_j == 0 and (w_i or w_j):
        if (lam >= 0.5 and w_i) or not w_j:
            n_i = 1
        else:
            n_j = 1
    return " ".join(_keep_words(w_i, n_i, generator) + _keep_words(w_j, n_j, generator))


def _half_words(t_i: str, t_j: str, generator: torch.Generator) -> str:
    """Variant e's caption: a random ``ceil(n/2)`` of the ``n`` words of ``T_i + T_j``, in order."""
    words = t_i.split() + t_j.split()
    return " ".join(_keep_words(words, (len(words) + 1) // 2, generator))


def _as_views(images: Images) -> tuple[list[torch.Tensor], bool]:
    if isinstance(images, torch.Tensor):
        return [images], True
    if isinstance(images, (list, tuple)) and images and all(isinstance(v, torch.Tensor) for v in images):
        return list(images), False
    raise TypeError("mixgen: images must be a tensor [B,C,H,W] or a non-empty list/tuple of such tensors")


def _pairs(batch: int, ratio: float, variant: str, generator: torch.Generator | None) -> tuple[torch.Tensor, ...]:
    if variant == "batch":
        if generator is None:
            raise ValueError("mixgen: variant 'batch' needs a generator")
        perm = torch.randperm(batch, generator=generator)
        return torch.arange(batch), perm
    m = int(ratio * batch)
    if batch >= 2:
        m = max(m, 1)
    if 2 * m > batch:
        raise ValueError(f"mixgen: ratio {ratio} gives M={m} pairs but a batch of {batch} needs B >= 2M")
    return torch.arange(m), torch.arange(m, 2 * m)


def mixgen_with_info(
    images: Images,
    texts: Sequence[str],
    *,
    ratio: float = 0.25,
    lam: float = 0.5,
    variant: str = "default",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | list[torch.Tensor], list[str], MixInfo]:
    """:func:`mixgen` that also returns the :class:`MixInfo` (which rows were mixed with which partners)."""
    if variant not in VARIANTS:
        raise ValueError(f"mixgen: unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"mixgen: lam must be in [0, 1], got {lam}")
    views, single = _as_views(images)
    batch = views[0].shape[0]
    for v, view in enumerate(views):
        if view.ndim != 4 or view.shape[0] != batch:
            raise ValueError(f"mixgen: image view {v} has shape {tuple(view.shape)}, expected [{batch},C,H,W]")
    texts = list(texts)
    if len(texts) != batch:
        raise ValueError(f"mixgen: {len(texts)} texts for {batch} images")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"mixgen: text row {i} is {type(t).__name__}, not str (MixGen runs before tokenization)")
    if variant != "default" and generator is None:
        raise ValueError(f"mixgen: variant {variant!r} draws random numbers and needs a generator")

    if batch < 2:
        rows = partners = torch.zeros(0, dtype=torch.long)
    else:
        rows, partners = _pairs(batch, ratio, variant, generator)
    m = rows.numel()
    if m == 0:
        empty = MixInfo(variant, rows, partners, torch.zeros(0, dtype=torch.float64), [])
        return (views[0].clone() if single else [v.clone() for v in views]), texts, empty

    # image weight of the row, per pair (variant c: a hard 0/1 choice of row or partner)
    if variant in ("a", "d", "e"):
        weights = sample_beta(BETA_ALPHA, BETA_ALPHA, m, generator)
    elif variant == "c":
        weights = 1.0 - torch.randint(0, 2, (m,), generator=generator).to(torch.float64)
    else:
        weights = torch.full((m,), float(lam), dtype=torch.float64)

    out_views = []
    for view in views:
        w = weights.to(view.dtype).view(m, *([1] * (view.ndim - 1)))
        # every pair at once from the unmodified input: no chaining even when partners are also rows
        if m == batch:  # batch variant: rows are 0..B-1
            out = w * view + (1 - w) * view[partners]
        else:  # paired variants: rows 0..M-1, partners M..2M-1, one slice op
            out = view.clone()
            out[:m] = w * view[:m] + (1 - w) * view[m : 2 * m]
        out_views.append(out)

    new_texts = list(texts)
    r_list, p_list = rows.tolist(), partners.tolist()
    if variant == "b":
        take_partner = torch.randint(0, 2, (m,), generator=generator).tolist()
        sources = ["partner" if t else "row" for t in take_partner]
        for k, (i, j) in enumerate(zip(r_list, p_list)):
            new_texts[i] = texts[j] if take_partner[k] else texts[i]
    elif variant == "d":
        sources = ["words"] * m
        for k, (i, j) in enumerate(zip(r_list, p_list)):
            new_texts[i] = _mix_words(texts[i], texts[j], float(weights[k]), generator)
    elif variant == "e":
        sources = ["half"] * m
        for i, j in zip(r_list, p_list):
            new_texts[i] = _half_words(texts[i], texts[j], generator)
    else:
        sources = ["concat"] * m
        for i, j in zip(r_list, p_list):
            new_texts[i] = texts[i] + " " + texts[j]

    info = MixInfo(variant, rows, partners, weights, sources)
    return (out_views[0] if single else out_views), new_texts, info


def mixgen(
    images: Images,
    texts: Sequence[str],
    *,
    ratio: float = 0.25,
    lam: float = 0.5,
    variant: str = "default",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | list[torch.Tensor], list[str]]:
    """Mix a minibatch; returns new ``(images, texts)`` (a list of views when given a list/tuple of views).

    ``images``: normalized ``[B,C,H,W]`` tensor, or several views (TCL) mixed with the same partners and
    weights. ``texts``: raw strings (a tuple is accepted, a list is returned). ``ratio``: M/B for the
    paired variants (ignored by ``batch``). ``lam``: the fixed image weight (default, b, batch).
    ``generator``: the only source of randomness, required by every variant but ``default``.
    """
    out_images, out_texts, _ = mixgen_with_info(
        images, texts, ratio=ratio, lam=lam, variant=variant, generator=generator
    )
    return out_images, out_texts


def apply_mixgen(batch: dict[str, Any], cfg: Any, *, seed: int, step: int, rank: int, micro: int = 0) -> dict[str, Any]:
    """Apply MixGen to a collated batch (``image``, optional ``image2``, ``text``) per the ``mixgen`` config.

    ``cfg`` is a :class:`pretrain.config.MixGenConfig` (``enabled``, ``variant``, ``ratio``, ``lam``). Returns a
    new dict (other keys shared, the anchor row's ``key``/``caption_idx`` kept) with ``mixgen_rows`` set to
    :meth:`MixInfo.as_dict`; with ``cfg.enabled`` false the batch itself is returned untouched. Randomness comes
    from :func:`mixgen_generator` ``(seed, step, rank, micro)``, ``micro`` being the micro-batch index within the
    step under gradient accumulation.
    """
    if not cfg.enabled:
        return batch
    for key in ("image", "text"):
        if key not in batch:
            raise KeyError(f"apply_mixgen: batch has no '{key}' (keys: {', '.join(map(str, batch))})")
    two_views = batch.get("image2") is not None
    images = [batch["image"], batch["image2"]] if two_views else batch["image"]
    gen = mixgen_generator(seed, step, rank, micro)
    mixed, texts, info = mixgen_with_info(
        images, batch["text"], ratio=cfg.ratio, lam=cfg.lam, variant=cfg.variant, generator=gen
    )
    out = dict(batch)
    if two_views:
        out["image"], out["image2"] = mixed
    else:
        out["image"] = mixed
    out["text"] = texts
    out["mixgen_rows"] = info.as_dict()
    return out


class BatchMixGen:
    """MixGen as the engine's batch augmentation (:class:`pretrain.protocol.BatchAugment`), as timm's ``mixup_fn``.

    ``augment(batch, step=s, micro=m)`` is :func:`apply_mixgen` with the generator of ``(seed, step, rank, micro)``:
    the micro-batches of one update under gradient accumulation get different pairings and λ draws.
    """

    def __init__(self, cfg: Any, *, seed: int, rank: int) -> None:
        self.cfg, self.seed, self.rank = cfg, int(seed), int(rank)
        self.image_log_every = int(getattr(cfg, "image_log_every", 0) or 0)

    def __call__(self, batch: dict[str, Any], *, step: int, micro: int = 0) -> dict[str, Any]:
        return apply_mixgen(batch, self.cfg, seed=self.seed, step=step, rank=self.rank, micro=micro)


def build_mixgen(cfg: Any | None, *, seed: int, rank: int) -> BatchMixGen | None:
    """The engine's MixGen augmentation from a ``mixgen`` config section; None when absent or disabled."""
    if cfg is None or not cfg.enabled:
        return None
    return BatchMixGen(cfg, seed=seed, rank=rank)
