"""Every training objective of the project, as functions of features (no model code): pretraining and each
fine-tuning head call these pieces, so a change of an objective is one change here.

Sections, in order:

* **CLIP contrastive** (:class:`ClipLoss`) with an autograd-aware feature gather (open_clip's ``local_loss +
  gather_with_grad`` scheme): each rank scores its own B features against the features of all ranks (B x B*world
  logits), targets offset by ``rank * B``; the summed gradient over ranks equals the global-batch gradient while
  memory stays linear in B. :func:`idx_contrastive_loss`: the same with image-id-aware soft targets (retrieval).
* **ALBEF contrastive with momentum distillation and queues** (:func:`momentum_itc`, :func:`distill_targets`,
  :func:`soft_cross_entropy`, :func:`itc_loss`, :func:`ramp_alpha`).
* **ITM with hard negatives** (:func:`sample_negatives`, :func:`hard_negative_itm`).
* **MLM** (:func:`mask_tokens` token-level as ALBEF, :func:`mask_words` whole-word as ViLT, :func:`mlm_distill_loss`).
* **TCL** intra-modal contrastive (:func:`intra_modal_loss`) and local mutual information
  (:func:`global_local_loss`, :func:`pool_patches`).
* **ViLT** ITM pairs (:func:`itm_negatives`) and word-patch alignment (:func:`ipot`, :func:`wpa_distance`,
  :func:`wpa_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # label of positions an MLM loss ignores (PyTorch's cross_entropy default)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns to each rank the summed gradient of its own slice.

    Written here rather than using ``torch.distributed.nn.all_gather`` (deprecated in torch 2.14, its successor
    is a private API); an all-reduce in backward works on every backend, gloo included.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - autograd signature
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.size = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on this rank's slice
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


def gather_features(x: torch.Tensor, gather_with_grad: bool = True) -> torch.Tensor:
    """Concatenate ``x`` ``[B, D]`` from every rank along dim 0 (rank order); identity when not distributed.

    With ``gather_with_grad`` the gather is autograd-aware: its backward sends each slice's summed gradient back
    to the rank that produced it (every rank must pass the same batch size). Without it, other ranks' slices
    are constants and only the local slice (re-inserted at this rank's position) carries gradient.
    """
    if not _distributed():
        return x
    if gather_with_grad:
        return _AllGather.apply(x)
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts, dim=0)


def contrastive_targets(batch_size: int, device: torch.device | str = "cpu", rank: int | None = None) -> torch.Tensor:
    """Indices of the positive pairs of this rank's rows among the gathered columns: ``arange(B) + rank * B``."""
    if rank is None:
        rank = dist.get_rank() if _distributed() else 0
    return torch.arange(batch_size, device=device) + rank * batch_size


class ClipLoss(nn.Module):
    """Symmetric InfoNCE between L2-normalized image and text features.

    ``local_loss=True`` computes the rows of this rank only (B x N logits, N = global batch); ``False`` builds the
    full N x N matrix on every rank (each rank then holds the whole loss; use it only for checking).
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad

    def logits(
        self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text), rows = this rank's samples when ``local_loss``."""
        all_image = gather_features(image, self.gather_with_grad)
        all_text = gather_features(text, self.gather_with_grad)
        if self.local_loss:
            return logit_scale * image @ all_text.T, logit_scale * text @ all_image.T
        per_image = logit_scale * all_image @ all_text.T
        return per_image, per_image.T

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
        per_image, per_text = self.logits(image, text, logit_scale)
        if self.local_loss:
            targets = contrastive_targets(image.shape[0], image.device)
        else:
            targets = torch.arange(per_image.shape[0], device=image.device)
        return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2


def idx_targets(row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
    """Soft ITC targets: ``pos / pos.sum(1)`` with ``pos[i, j] = (row_ids[i] == col_ids[j])``."""
    pos = (row_ids.view(-1, 1) == col_ids.view(1, -1)).float()
    return pos / pos.sum(dim=1, keepdim=True).clamp_min(1.0)


def idx_contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_ids: torch.Tensor,
    scale: torch.Tensor | float,
    momentum: tuple[torch.Tensor, torch.Tensor] | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Image-id-aware symmetric contrastive loss on normalized features (this rank's rows, all ranks' columns):
    every caption of the same image is a positive (ALBEF's retrieval fine-tuning).

    ``momentum``: the momentum model's (image, text) features of the same samples; the targets become
    ``alpha * softmax(momentum similarities) + (1 - alpha) * id targets`` (ALBEF's retrieval distillation).
    """
    all_image = gather_features(image_feat, True)
    all_text = gather_features(text_feat, True)
    all_ids = gather_features(image_ids.view(-1, 1), False).view(-1)
    targets = idx_targets(image_ids, all_ids).to(image_feat.device)
    targets_i2t = targets_t2i = targets
    if momentum is not None and alpha > 0:
        with torch.no_grad():
            image_m, text_m = (f.float() for f in momentum)
            all_image_m, all_text_m = gather_features(image_m, False), gather_features(text_m, False)
            targets_i2t = alpha * F.softmax(scale * image_m @ all_text_m.T, dim=1) + (1 - alpha) * targets
            targets_t2i = alpha * F.softmax(scale * text_m @ all_image_m.T, dim=1) + (1 - alpha) * targets
    logits_i2t = scale * image_feat.float() @ all_text.float().T
    logits_t2i = scale * text_feat.float() @ all_image.float().T
    return (soft_cross_entropy(logits_i2t, targets_i2t) + soft_cross_entropy(logits_t2i, targets_t2i)) / 2


# ============================================================================ ALBEF: ITC with momentum distillation
def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-mean_b sum_j targets[b, j] * log_softmax(logits)[b, j]`` (float32)."""
    return -(targets.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def distill_targets(sim_m: torch.Tensor | None, batch: int, alpha: float) -> torch.Tensor:
    """ITC targets over ``B + Q`` columns: ``alpha * softmax(sim_m) + (1 - alpha) * onehot(diagonal)``.

    ``sim_m`` (the momentum model's similarities) may be ``None`` (no distillation: hard targets).
    """
    rows = batch
    cols = sim_m.shape[1] if sim_m is not None else batch
    hard = torch.zeros(rows, cols, device=sim_m.device if sim_m is not None else None)
    hard[:, :batch] = torch.eye(batch, device=hard.device)
    if sim_m is None or alpha == 0.0:
        return hard
    return alpha * F.softmax(sim_m.float(), dim=1) + (1.0 - alpha) * hard


def itc_loss(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, target_i2t: torch.Tensor, target_t2i: torch.Tensor
) -> torch.Tensor:
    """ALBEF's image-text contrastive loss: the mean of the two soft cross-entropies."""
    return (soft_cross_entropy(sim_i2t, target_i2t) + soft_cross_entropy(sim_t2i, target_t2i)) / 2


class MomentumItc(NamedTuple):
    loss: torch.Tensor
    sim_i2t: torch.Tensor  # [B, B] online image x momentum batch texts (the hard-negative weights of ITM)
    sim_t2i: torch.Tensor  # [B, B]


def momentum_itc(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_all: torch.Tensor,
    text_feat_all: torch.Tensor,
    temp: torch.Tensor | float,
    alpha: float,
    image_feat_m: torch.Tensor | None = None,
    text_feat_m: torch.Tensor | None = None,
) -> MomentumItc:
    """ALBEF's ITC: online features against ``*_all = [momentum batch features; queue]`` ``[B + Q, D]``.

    Targets: ``alpha * softmax(momentum features @ *_all / temp) + (1 - alpha) * onehot`` (distillation from
    ``image_feat_m``/``text_feat_m``, the first B rows of ``*_all`` when not given). Also returns the batch block
    of the online similarities for :func:`hard_negative_itm`.
    """
    bsz = image_feat.shape[0]
    image_feat_m = image_feat_all[:bsz] if image_feat_m is None else image_feat_m
    text_feat_m = text_feat_all[:bsz] if text_feat_m is None else text_feat_m
    sim_i2t = image_feat @ text_feat_all.T / temp
    sim_t2i = text_feat @ image_feat_all.T / temp
    with torch.no_grad():
        target_i2t = distill_targets(image_feat_m @ text_feat_all.T / temp, bsz, alpha)
        target_t2i = distill_targets(text_feat_m @ image_feat_all.T / temp, bsz, alpha)
    loss = itc_loss(sim_i2t, sim_t2i, target_i2t, target_t2i)
    return MomentumItc(loss, sim_i2t[:, :bsz], sim_t2i[:, :bsz])


def ramp_alpha(alpha: float, step: int | None, steps_per_epoch: int | None) -> float:
    """ALBEF's warm-up: ``alpha * min(1, step / steps_per_epoch)``; full alpha when either is unknown.

    ``step`` and ``steps_per_epoch`` must count the same thing: optimizer updates (with gradient accumulation k an
    epoch of ``n`` micro-batches is ``n / k`` updates).
    """
    if step is None or not steps_per_epoch:
        return alpha
    return alpha * min(1.0, float(step) / float(steps_per_epoch))


# ============================================================================ ITM with hard negatives
def sample_negatives(
    sim: torch.Tensor, exclude: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """For each row ``b`` of ``sim`` ``[B, B]``, draw a column ``j != b`` with probability ``softmax(sim[b])``.

    Robust where ALBEF's ``multinomial`` crashes: non-finite similarities are sanitised, ``exclude[b, j]`` (e.g.
    identical captions) removes candidates, and a row left with no mass falls back to a uniform draw over the other
    indices (ignoring ``exclude``; with B = 1 there is none and the row returns itself — callers skip negatives
    then). Never returns ``b`` when ``B > 1``.
    """
    n = sim.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"sample_negatives: need a square [B, B] matrix, got {tuple(sim.shape)}")
    if n == 1:
        return torch.zeros(1, dtype=torch.long, device=sim.device)
    logits = torch.nan_to_num(sim.detach().float(), nan=0.0, posinf=1e4, neginf=-1e4).clamp(-1e4, 1e4)
    eye = torch.eye(n, dtype=torch.bool, device=sim.device)
    blocked = eye if exclude is None else (eye | exclude.to(sim.device, torch.bool))
    # the softmax over the candidates only: ALBEF's softmax-then-zero-the-diagonal is the same distribution, but a
    # dominant diagonal at a low temperature underflows every other weight to 0 in float32 first
    weights = F.softmax(logits.masked_fill(blocked, float("-inf")), dim=1)
    others = (~eye).float()
    total = weights.sum(dim=1, keepdim=True)
    dead = ~(torch.isfinite(total) & (total > 0))
    weights = torch.where(dead, others, weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


class ItmOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor  # [3B, 2] (B positives, B (text, negative image), B (negative text, image)); [B, 2] if B = 1
    labels: torch.Tensor
    neg_image: torch.Tensor | None  # for text b, the index of its negative image
    neg_text: torch.Tensor | None  # for image b, the index of its negative text


ItmScore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def hard_negative_itm(
    score: ItmScore,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    text_mask: torch.Tensor,
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    exclude: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ItmOutput:
    """ALBEF's ITM: B positives + one hard negative image per text + one hard negative text per image.

    ``score(image_embeds, text_embeds, text_mask) -> [N, 2]`` logits (index 1 = match) runs the fusion encoder once
    over all 3B pairs. Negatives are drawn with :func:`sample_negatives` from ``softmax(sim_t2i[b])`` (images for
    text b) and ``softmax(sim_i2t[b])`` (texts for image b), never the anchor, never a column ``exclude`` marks.
    With a batch of one there is no negative: the positive alone is scored.
    """
    bsz = image_embeds.shape[0]
    neg_image = neg_text = None
    if bsz > 1:
        with torch.no_grad():
            neg_image = sample_negatives(sim_t2i, exclude, generator)
            neg_text = sample_negatives(sim_i2t, exclude, generator)
        images = torch.cat([image_embeds, image_embeds[neg_image], image_embeds], dim=0)
        texts = torch.cat([text_embeds, text_embeds, text_embeds[neg_text]], dim=0)
        mask = torch.cat([text_mask, text_mask, text_mask[neg_text]], dim=0)
    else:
        images, texts, mask = image_embeds, text_embeds, text_mask
    logits = score(images, texts, mask).float()
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:bsz] = 1
    return ItmOutput(F.cross_entropy(logits, labels), logits, labels, neg_image, neg_text)


# ============================================================================ MLM
def _draw(p: float, shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device="cpu").to(device) < p


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_ids: Sequence[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking by token: select ``probability`` of the tokens not in ``special_ids``; of those 80% ->
    [MASK], 10% -> a random id, 10% unchanged. Returns ``(masked_ids, labels)`` with ``labels = -100`` where not
    selected. ALBEF excludes only [PAD] and [CLS] (its tokenizer writes no [SEP])."""
    device = input_ids.device
    ids = input_ids.clone()
    labels = input_ids.clone()
    special = torch.isin(input_ids, torch.tensor(list(special_ids), device=device))
    selected = _draw(probability, ids.shape, generator, device) & ~special
    labels[~selected] = IGNORE
    to_mask = _draw(0.8, ids.shape, generator, device) & selected
    ids[to_mask] = mask_token_id
    to_random = _draw(0.5, ids.shape, generator, device) & selected & ~to_mask
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator, device="cpu").to(device)
    ids[to_random] = random_ids[to_random]
    return ids, labels


def mask_words(
    input_ids: torch.Tensor,
    word_ids: torch.Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking by word (ViLT's whole-word masking): ``(masked_ids, labels)``, labels ``-100`` where not masked.

    ``word_ids`` ``[B, L]``: the word each token belongs to, ``-1`` for specials and padding (never masked). Each
    word is chosen with ``probability`` (so each token is masked with that probability, and all pieces of a word
    together); a row with candidates but no chosen word gets the word with the smallest draw, so every caption
    predicts at least one token (as HF's whole-word collator). A chosen token becomes [MASK] with probability
    0.8, a uniform random id with 0.1, and stays with 0.1. Draws: ``[B, W]`` word uniforms, ``[B, L]`` token
    uniforms, ``[B, L]`` random ids. Token-level masking = word ids that are the token positions.
    """
    bsz, length = input_ids.shape
    cand = word_ids >= 0
    wid = word_ids.clamp_min(0).cpu()
    n_words = int(wid.max().item()) + 1 if wid.numel() else 1
    u = torch.rand(bsz, n_words, generator=generator)
    valid_word = torch.zeros(bsz, n_words).scatter_add_(1, wid, cand.cpu().float()) > 0
    chosen = (u < probability) & valid_word
    empty = valid_word.any(1) & ~chosen.any(1)
    fallback = torch.where(valid_word, u, torch.full_like(u, 2.0)).argmin(1)
    chosen[empty, fallback[empty]] = True
    masked = (chosen.gather(1, wid) & cand.cpu()).to(input_ids.device)
    r = torch.rand(bsz, length, generator=generator).to(input_ids.device)
    random_ids = torch.randint(vocab_size, (bsz, length), generator=generator).to(input_ids.device)
    out = input_ids.clone()
    out[masked & (r < 0.8)] = mask_token_id
    swap = masked & (r >= 0.8) & (r < 0.9)
    out[swap] = random_ids[swap]
    labels = torch.where(masked, input_ids, torch.full_like(input_ids, IGNORE))
    return out, labels


def mlm_distill_loss(
    logits: torch.Tensor, labels: torch.Tensor, logits_m: torch.Tensor | None, alpha: float
) -> torch.Tensor:
    """``(1 - alpha) * CE(logits, labels) + alpha * mean_masked(-sum softmax(logits_m) * log_softmax(logits))``.

    ``logits`` ``[N, V]`` and ``labels`` ``[N]`` (rows may include ignored ``-100`` labels). Zero when nothing is
    masked (keeps the graph so every rank runs the same backward). ``logits_m`` None or ``alpha`` 0: plain CE.
    """
    keep = labels != IGNORE
    if not bool(keep.any()):
        return logits.sum() * 0.0
    logits, labels = logits[keep].float(), labels[keep]
    loss = F.cross_entropy(logits, labels)
    if logits_m is None or alpha == 0.0:
        return loss
    soft = F.softmax(logits_m[keep].float(), dim=-1)
    distill = -(soft * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
    return (1.0 - alpha) * loss + alpha * distill


# ============================================================================ TCL: IMC and LMI
def intra_modal_loss(feat: torch.Tensor, feat_all: torch.Tensor, temp: torch.Tensor | float) -> torch.Tensor:
    """TCL's IMC for one modality: ``feat`` ``[B, D]`` (online) against ``feat_all`` ``[B + Q, D]`` (momentum features
    of the same samples, then the queue); the positive of row ``b`` is column ``b`` (hard targets)."""
    bsz = feat.shape[0]
    targets = torch.arange(bsz, device=feat.device)
    return F.cross_entropy((feat.float() @ feat_all.float().T) / temp, targets)


def global_local_loss(
    local: torch.Tensor, glob: torch.Tensor, temp: torch.Tensor | float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """TCL's in-batch global-to-local InfoNCE (LMI).

    ``local`` ``[B, n, D]`` (momentum, normalised), ``glob`` ``[B, D]`` (online, normalised), ``mask`` ``[B, n]``
    (1 = valid local; text padding). For a valid local ``j`` of sample ``b`` the positive logit is
    ``<local[b, j], glob[b]> / τ`` and the negatives are ``<glob[b], local[b', j']> / τ`` for every ``b' != b`` and
    valid ``j'``. Loss = ``-log softmax(positive)``, averaged over the valid locals of each sample, then over samples.
    """
    bsz, n, _ = local.shape
    local, glob = local.float(), glob.float()
    if mask is None:
        mask = torch.ones(bsz, n, device=local.device)
    valid = mask.to(local.device).bool()
    pos = torch.einsum("bnd,bd->bn", local, glob) / temp  # [B, n]
    neg = (glob @ local.reshape(bsz * n, -1).T / temp).reshape(bsz, bsz, n)  # [B(anchor), B', n]
    eye = torch.eye(bsz, dtype=torch.bool, device=local.device)
    drop = eye[:, :, None] | ~valid[None, :, :]
    neg = neg.masked_fill(drop, float("-inf")).reshape(bsz, bsz * n)
    # the negatives of sample b are the same for all its locals: one logsumexp per sample
    lse_neg = torch.logsumexp(neg, dim=1, keepdim=True)  # -inf when there is no negative (B = 1)
    per_local = torch.logaddexp(pos, lse_neg.expand_as(pos)) - pos  # -log softmax(pos)
    per_local = per_local.masked_fill(~valid, 0.0)
    per_sample = per_local.sum(dim=1) / valid.sum(dim=1).clamp_min(1)
    return per_sample.mean()


def pool_patches(tokens: torch.Tensor, grid: tuple[int, int], out: int) -> torch.Tensor:
    """Patch tokens ``[B, H*W, D]`` on a ``grid`` -> average-pooled ``[B, out*out, D]``."""
    bsz, count, dim = tokens.shape
    h, w = grid
    if count != h * w:
        raise ValueError(f"{count} patch tokens do not form the {h}x{w} grid")
    x = tokens.transpose(1, 2).reshape(bsz, dim, h, w)
    x = F.adaptive_avg_pool2d(x, (min(out, h), min(out, w)))
    return x.flatten(2).transpose(1, 2)


# ============================================================================ ViLT: ITM pairs, word-patch alignment
def itm_negatives(batch_size: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM labels and the image row each text is paired with (in-batch variant of ViLT's rule).

    ``B // 2`` ones and ``B - B // 2`` zeros, shuffled by a random permutation; a text labelled 0 gets the image of
    another row ``(i + r) % B`` with ``r`` uniform in ``[1, B)`` (never its own). Draws: the permutation, then ``B``
    offsets. With ``B == 1`` no negative exists: the single row stays positive.
    """
    if batch_size < 2:
        return torch.ones(batch_size, dtype=torch.long), torch.arange(batch_size)
    labels = itm_labels(batch_size, generator)
    offsets = torch.randint(1, batch_size, (batch_size,), generator=generator)
    rows = torch.arange(batch_size)
    image_index = torch.where(labels == 1, rows, (rows + offsets) % batch_size)
    return labels, image_index


def itm_labels(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """ViLT's ITM labels: ``B // 2`` ones and the rest zeros, in a random order (B = 1: one positive)."""
    if batch_size < 2:
        return torch.ones(batch_size, dtype=torch.long)
    pos = batch_size // 2
    labels = torch.cat([torch.ones(pos, dtype=torch.long), torch.zeros(batch_size - pos, dtype=torch.long)])
    return labels[torch.randperm(batch_size, generator=generator)]


@torch.no_grad()
def ipot(
    cost: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, beta: float = 0.5, iterations: int = 50
) -> torch.Tensor:
    """Transport plan ``[B, m, n]`` between uniform marginals on the valid rows and columns (IPOT, Xie et al.).

    Proximal point iterations: ``Q = exp(-C/beta) * T``; one Sinkhorn scaling ``a = mu / (Q b)``,
    ``b = nu / (Q^T a)``; ``T = diag(a) Q diag(b)``. Invalid rows/columns carry no mass.
    """
    cost = cost.float()
    joint = (row_valid[:, :, None] & col_valid[:, None, :]).float()
    mu = row_valid.float() / row_valid.float().sum(1, keepdim=True).clamp_min(1.0)
    nu = col_valid.float() / col_valid.float().sum(1, keepdim=True).clamp_min(1.0)
    kernel = torch.exp(-cost / beta) * joint
    plan = joint.clone()
    b = nu.clone()
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(iterations):
        q = kernel * plan
        a = torch.where(row_valid, mu / torch.bmm(q, b[:, :, None]).squeeze(2).clamp_min(tiny), 0.0)
        b = torch.where(col_valid, nu / torch.bmm(q.transpose(1, 2), a[:, :, None]).squeeze(2).clamp_min(tiny), 0.0)
        plan = a[:, :, None] * q * b[:, None, :]
    return plan


def wpa_distance(
    text: torch.Tensor,
    image: torch.Tensor,
    text_valid: torch.Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    image_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row optimal-transport distance between text tokens and image patches (cosine cost), ``[B]``.

    The plan is computed without gradient; the distance ``sum(C * T)`` carries the gradient through the cost.
    """
    text = F.normalize(text.float(), dim=-1)
    image = F.normalize(image.float(), dim=-1)
    cost = 1.0 - text @ image.transpose(1, 2)
    if image_valid is None:
        image_valid = torch.ones(image.shape[:2], dtype=torch.bool, device=image.device)
    plan = ipot(cost.detach(), text_valid, image_valid.bool(), beta=beta, iterations=iterations)
    return (cost * plan).sum(dim=(1, 2))


def wpa_loss(distance: torch.Tensor, itm_labels: torch.Tensor) -> torch.Tensor:
    """ViLT's ``ot_loss``: ``(sum d(positive pairs) - sum d(negative pairs)) / B`` (aligned pairs must be closer)."""
    pos = itm_labels == 1
    return (distance[pos].sum() - distance[~pos].sum()) / distance.shape[0]

