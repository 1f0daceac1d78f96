"""ALBEF's generative VQA answer decoder: training with per-answer weights, and ranking a closed answer list.

:class:`AnswerDecoder` is a BERT decoder built from transformers' pieces (no fork): embeddings, ``n`` layers with
causal self-attention and cross-attention to the *question encoder states* (the fused multimodal states of the
question over the image, not the image tokens), and an MLM-style LM head. :func:`init_from_backbone` starts it as
ALBEF's checkpoint surgery does: decoder layer ``k`` <- fusion layer ``fusion_layer + k`` of the pretrained text
encoder (self-attention, cross-attention, FFN), embeddings <- the text embeddings, LM head <- the MLM head. When the
image width differs from the text width (small configs), the cross-attention key/value cannot be copied and keep
BERT's initialisation (reported).

Answers are tokenised ``[CLS] answer [SEP]`` ([CLS] is the start token; the tokenizer appends [SEP], so no manual
one). The loss of an answer is the sum of its token cross-entropies ([SEP] included); with distillation
``(1 - alpha) * nll + alpha * soft`` where ``soft`` is the per-token cross-entropy against the momentum decoder's
softmax. A question's loss is ``sum_a weight_a * loss_a`` and the batch loss their sum over the batch size.

Ranking (:func:`rank_answers`), ALBEF's ``rank_answer``: one decoder step from [CLS] gives every candidate's
first-token probability; the ``k`` candidates with the highest are teacher-forced in full and scored by their
log-likelihood. ``score="loglik"`` (default, BLIP/LAVIS) ranks by the sequence log-likelihood, which already
contains the first token once; ``score="albef"`` adds log p(first token) a second time as ALBEF's code does, which
favours answers whose first token is likely and can change the winner between multi-token answers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead

from pretrain.models.fusion import bert_init_weights, extended_mask

RankScore = Literal["loglik", "albef"]


def causal_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[N, T]`` keep-mask -> additive ``[N, 1, T, T]``: position t sees kept positions <= t."""
    t = mask.shape[1]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool, device=mask.device))[None] & mask[:, None, :].bool()
    additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


class AnswerDecoder(nn.Module):
    """Causal BERT decoder over answer tokens, cross-attending to question states of width ``encoder_width``."""

    def __init__(self, config: BertConfig, num_layers: int, encoder_width: int) -> None:
        super().__init__()
        cfg = copy.deepcopy(config)
        cfg.is_decoder = True
        cfg.add_cross_attention = True
        cfg._attn_implementation = "sdpa"
        cfg.num_hidden_layers = num_layers
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            layer = BertLayer(cfg, layer_idx=i)
            layer.attention.self.is_causal = False  # the explicit causal mask below decides
            cross = layer.crossattention.self
            cross.key = nn.Linear(encoder_width, cross.all_head_size)
            cross.value = nn.Linear(encoder_width, cross.all_head_size)
            self.layers.append(layer)
        self.lm_head = BertOnlyMLMHead(cfg)
        del self.lm_head.predictions.bias  # the forward reads decoder.bias only (see pretrain.models.albef)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        bert_init_weights(module, self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor,
                states_mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Next-token logits ``[N, T, V]`` (float32) of answers ``input_ids`` given question ``states``."""
        hidden = self.embeddings(input_ids=input_ids)
        dtype = hidden.dtype
        self_mask = causal_mask(attention_mask, dtype)
        cross_mask = extended_mask(states_mask, dtype)
        states = states.to(dtype)
        for layer in self.layers:
            hidden = layer(hidden, self_mask, encoder_hidden_states=states, encoder_attention_mask=cross_mask)
        return self.lm_head(hidden).float()

    def tie(self) -> None:
        """Share the LM head's output matrix with the word embeddings (BERT's and ALBEF's decoder do)."""
        self.lm_head.predictions.decoder.weight = self.embeddings.word_embeddings.weight


def build_decoder(backbone: nn.Module) -> tuple[AnswerDecoder, list[str]]:
    """A decoder shaped like ``backbone``'s fusion layers and initialised from them; returns it and the keys left at
    their initialisation (cross-attention key/value when the image and text widths differ)."""
    enc = backbone.text_encoder
    fusion = int(enc.fusion_layer)
    n = len(enc.encoder.layer) - fusion
    if n < 1:
        raise ValueError("the backbone has no fusion layer to initialise the answer decoder from")
    hidden = int(enc.config.hidden_size)
    dec = AnswerDecoder(enc.config, n, hidden)
    fresh: list[str] = []
    with torch.no_grad():
        dec.embeddings.load_state_dict(enc.embeddings.state_dict())
        for k in range(n):
            src = enc.encoder.layer[fusion + k].state_dict()
            own = dec.layers[k].state_dict()
            keep = {key: v for key, v in src.items() if key in own and own[key].shape == v.shape}
            fresh += [f"layers.{k}.{key}" for key in own if key not in keep]
            dec.layers[k].load_state_dict(keep, strict=False)
        head = getattr(backbone, "mlm_head", None)
        if head is not None:
            dec.lm_head.load_state_dict(head.state_dict())
        else:
            fresh.append("lm_head")
    if getattr(getattr(backbone, "opts", None), "tie_mlm_head", False):
        dec.tie()
    return dec, fresh


def answer_tokens(tokenizer: Callable, answers: Sequence[str], device: torch.device | None = None,
                  max_length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``[CLS] answer [SEP]`` ids and mask, padded to the longest."""
    enc = tokenizer(list(answers), padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum of ``-log p(ids[t] | ids[<t])`` over kept positions t >= 1 (``[N]``)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(picked * mask[:, 1:].float()).sum(1)


def token_soft_ce(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sum over kept positions t >= 1 of the cross-entropy against the teacher's softmax (``[N]``)."""
    soft = F.softmax(teacher_logits[:, :-1].float(), dim=-1)
    ce = -(soft * F.log_softmax(logits[:, :-1].float(), dim=-1)).sum(-1)
    return (ce * mask[:, 1:].float()).sum(1)


def weighted_answer_loss(per_answer: torch.Tensor, weights: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``sum_a weight_a * loss_a / batch_size`` (ALBEF's VQA loss)."""
    return (weights.float() * per_answer).sum() / max(1, batch_size)


@torch.no_grad()
def rank_answers(
    step_logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    num_questions: int,
    cand_ids: torch.Tensor,
    cand_mask: torch.Tensor,
    k: int,
    score: RankScore = "loglik",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best candidate per question: ``(indices [Q], their scores [Q])``.

    ``step_logits(input_ids [N, T], mask [N, T], rows [N])`` returns next-token logits ``[N, T, V]`` for answer
    prefixes of questions ``rows``; ``cand_ids``/``cand_mask`` ``[C, T]`` are the tokenised candidates (all start
    with the same start token).
    """
    if score not in ("loglik", "albef"):
        raise ValueError(f"score must be 'loglik' or 'albef', got {score!r}")
    device = cand_ids.device
    rows = torch.arange(num_questions, device=device)
    start = cand_ids[:1, :1].expand(num_questions, 1)
    first = F.log_softmax(step_logits(start, torch.ones_like(start), rows)[:, 0].float(), dim=-1)  # [Q, V]
    first_lp = first[:, cand_ids[:, 1]]  # [Q, C]
    kk = min(int(k), cand_ids.shape[0])
    top_lp, top_idx = first_lp.topk(kk, dim=1)  # [Q, k]
    flat = top_idx.reshape(-1)
    ids, mask = cand_ids[flat], cand_mask[flat]
    logits = step_logits(ids, mask, rows.repeat_interleave(kk))
    loglik = -token_nll(logits, ids, mask).view(num_questions, kk)
    scores = loglik + top_lp if score == "albef" else loglik
    best = scores.argmax(dim=1)
    return top_idx.gather(1, best[:, None]).squeeze(1), scores.gather(1, best[:, None]).squeeze(1)
