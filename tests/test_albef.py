"""ALBEF: each objective against a hand computation, the negative sampler's edge cases, MLM masking statistics,
queue/momentum mechanics, state_dict round trip and the fusion encoder (pretrained load, NLVR2 pairs, Grad-CAM maps).
The 2-process torchrun resume test is in test_model_resume.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig

from pretrain.models.albef import Albef, AlbefOptions
from pretrain.models.encoders import TextOptions, VisionOptions, build_text_encoder
from pretrain.models.fusion import FusionBert
from pretrain.models.momentum import FeatureQueues, ema_update
from pretrain.objectives import distill_targets, itc_loss, mask_tokens, mlm_distill_loss, ramp_alpha, sample_negatives

TEXTS = ["a red circle", "two blue squares on the left", "a green triangle", "a yellow star above a cat"]


def tiny_options(**kw) -> AlbefOptions:
    base = dict(
        vision=VisionOptions(name="vit_tiny_patch16_224", kwargs={"depth": 1, "patch_size": 8}),
        text=TextOptions(config={"num_hidden_layers": 2}),
        image_size=16,
        embed_dim=16,
        queue_size=8,
    )
    base.update(kw)
    return AlbefOptions(**base)


@pytest.fixture(scope="module")
def model() -> Albef:
    torch.manual_seed(0)
    return Albef(tiny_options())


def batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 16, 16, generator=g), "text": list(TEXTS[:n])}


def manual_softmax(row: list[float]) -> list[float]:
    top = max(row)
    e = [math.exp(v - top) for v in row]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------------------------ ITC


def test_itc_with_queue_and_distillation_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    bsz, q, d, temp, alpha = 2, 3, 4, 0.1, 0.3
    img, txt, img_m, txt_m = (F.normalize(torch.randn(bsz, d, generator=g), dim=1) for _ in range(4))
    img_q, txt_q = (F.normalize(torch.randn(q, d, generator=g), dim=1) for _ in range(2))
    txt_all, img_all = torch.cat([txt_m, txt_q]), torch.cat([img_m, img_q])
    sim_i2t, sim_t2i = img @ txt_all.T / temp, txt @ img_all.T / temp
    loss = itc_loss(
        sim_i2t,
        sim_t2i,
        distill_targets(img_m @ txt_all.T / temp, bsz, alpha),
        distill_targets(txt_m @ img_all.T / temp, bsz, alpha),
    )

    def one_direction(a, a_m, cols):
        total = 0.0
        for b in range(bsz):
            s = [float(a[b] @ c) / temp for c in cols]
            s_m = [float(a_m[b] @ c) / temp for c in cols]
            q_m = manual_softmax(s_m)
            target = [alpha * q_m[j] + (1 - alpha) * (1.0 if j == b else 0.0) for j in range(len(cols))]
            logp = [math.log(p) for p in manual_softmax(s)]
            total += -sum(t * lp for t, lp in zip(target, logp))
        return total / bsz

    expected = (one_direction(img, img_m, txt_all) + one_direction(txt, txt_m, img_all)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # only the first B columns can hold the hard positive
    hard = distill_targets(torch.zeros(bsz, bsz + q), bsz, 0.0)
    assert torch.equal(hard[:, :bsz], torch.eye(bsz)) and hard[:, bsz:].abs().sum() == 0


def test_alpha_ramps_over_the_first_epoch():
    assert ramp_alpha(0.4, 5, 10) == pytest.approx(0.2)
    assert ramp_alpha(0.4, 0, 10) == 0.0
    assert ramp_alpha(0.4, 50, 10) == pytest.approx(0.4)
    assert ramp_alpha(0.4, None, None) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------------ ITM


def test_negative_sampler_never_picks_itself_even_when_self_dominates():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(5, 5, generator=g)
    sim.fill_diagonal_(100.0)
    for _ in range(50):
        idx = sample_negatives(sim, generator=g)
        assert (idx != torch.arange(5)).all()
    # a dominant off-diagonal column is (nearly always) the hard negative
    sim = torch.zeros(3, 3)
    sim[0, 2] = sim[1, 0] = sim[2, 1] = 30.0
    assert sample_negatives(sim, generator=g).tolist() == [2, 0, 1]


@pytest.mark.parametrize(
    "sim",
    [
        torch.ones(4, 4),  # equal rows (MixGen near-duplicates)
        torch.full((4, 4), float("nan")),
        torch.tensor([[float("inf")] * 4] * 4),
        torch.tensor([[0.0, float("-inf"), float("inf"), float("nan")]] * 4),
        torch.full((4, 4), float("-inf")),
    ],
)
def test_negative_sampler_survives_degenerate_similarities(sim):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = sample_negatives(sim, generator=g)
        assert idx.shape == (4,) and ((idx >= 0) & (idx < 4)).all()
        assert (idx != torch.arange(4)).all()


def test_negative_sampler_batch_one_and_all_excluded_fallback():
    assert sample_negatives(torch.zeros(1, 1)).tolist() == [0]
    everything = torch.ones(3, 3, dtype=torch.bool)  # e.g. three identical captions
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert (sample_negatives(torch.randn(3, 3), everything, g) != torch.arange(3)).all()


def test_itm_pairs_layout_labels_and_loss(model, monkeypatch):
    model.train()
    b = batch(4)
    tokens = model.tokenize(b["text"])
    image_embeds, _ = model.encode_image(b["image"])
    text_embeds, _ = model.encode_text(tokens)
    seen = {}
    original_fuse = model.fuse

    def spy(images, text, *args, **kwargs):
        seen["images"], seen["text"] = images, text[0]
        return original_fuse(images, text, *args, **kwargs)

    original_logits = model.itm_logits

    def spy_logits(fused):
        seen["logits"] = original_logits(fused)
        return seen["logits"]

    monkeypatch.setattr(model, "fuse", spy)
    monkeypatch.setattr(model, "itm_logits", spy_logits)
    sim = torch.randn(4, 4)
    state = {"image_embeds": image_embeds, "text_embeds": text_embeds, "tokens": tokens, "texts": b["text"]}
    state.update(sim_i2t=sim, sim_t2i=sim.T.clone())
    loss = model.itm_loss(state)
    images, text = seen["images"], seen["text"]
    assert images.shape[0] == text.shape[0] == 12
    assert torch.equal(images[:4], image_embeds) and torch.equal(text[:4], text_embeds)  # positives
    assert torch.equal(text[4:8], text_embeds) and torch.equal(images[8:], image_embeds)
    for b_ in range(4):  # negatives are other samples
        assert not torch.equal(images[4 + b_], image_embeds[b_])
        assert not torch.equal(text[8 + b_], text_embeds[b_])
    labels = torch.tensor([1] * 4 + [0] * 8)
    assert loss.item() == pytest.approx(F.cross_entropy(seen["logits"], labels).item(), rel=1e-6)


def test_itm_with_batch_of_one_uses_positives_only(model):
    model.train()
    out = model(batch(1))
    model.discard_step()
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["losses"]["itm"])
    model.eval()  # no dropout: the value can be recomputed
    b = batch(1)
    with torch.no_grad():
        out = model(b)
        tokens = model.tokenize(b["text"])
        image_embeds, _ = model.encode_image(b["image"])
        text_embeds, _ = model.encode_text(tokens)
        logits = model.itm_logits(model.fuse(image_embeds, (text_embeds, tokens.attention_mask)))
    # the single positive pair alone, labelled "match"
    assert out["losses"]["itm"].item() == pytest.approx(-F.log_softmax(logits, 1)[0, 1].item(), rel=1e-5)
    model.train()


# ------------------------------------------------------------------------------------------------ MLM


def test_mask_tokens_statistics_and_specials_untouched():
    g = torch.Generator().manual_seed(0)
    n, length, pad, cls, sep, mask_id = 4000, 32, 0, 101, 102, 103
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    ids[:, 0] = cls
    lengths = torch.randint(5, length, (n,), generator=g)
    for i, k in enumerate(lengths.tolist()):
        ids[i, k] = sep
        ids[i, k + 1 :] = pad
    special = (ids == pad) | (ids == cls) | (ids == sep)
    masked, labels = mask_tokens(
        ids, vocab_size=30522, mask_token_id=mask_id, special_ids=[pad, cls, sep, 100, 103], generator=g
    )
    selected = labels != -100
    assert not (selected & special).any()
    assert torch.equal(masked[special], ids[special])
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    frac = selected.sum().item() / (~special).sum().item()
    assert frac == pytest.approx(0.15, abs=0.005)
    n_sel = selected.sum().item()
    to_mask = (masked[selected] == mask_id).sum().item() / n_sel
    same = (masked[selected] == ids[selected]).sum().item() / n_sel
    rand = 1 - to_mask - same
    assert to_mask == pytest.approx(0.8, abs=0.01)
    assert same == pytest.approx(0.1, abs=0.01) and rand == pytest.approx(0.1, abs=0.01)


def test_mlm_distillation_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(3)
    logits, logits_m = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    labels = torch.tensor([2, -100, 0, 4])
    alpha = 0.4
    got = mlm_distill_loss(logits, labels, logits_m, alpha).item()
    ce, dist, rows = 0.0, 0.0, [0, 2, 3]
    for r in rows:
        logp = [math.log(p) for p in manual_softmax(logits[r].tolist())]
        ce += -logp[int(labels[r])]
        soft = manual_softmax(logits_m[r].tolist())
        dist += -sum(s * lp for s, lp in zip(soft, logp))
    expected = (1 - alpha) * ce / len(rows) + alpha * dist / len(rows)
    assert got == pytest.approx(expected, rel=1e-5)
    assert mlm_distill_loss(logits, torch.full((4,), -100), logits_m, alpha).item() == 0.0


# ------------------------------------------------------------------------------------------------ queues, EMA


def test_queue_pointer_wraps_and_divisibility_error():
    q = FeatureQueues(["image", "text"], dim=2, size=6)
    rows = [torch.full((2, 2), float(i)) for i in range(4)]
    for i, r in enumerate(rows):
        q.enqueue(image=r, text=-r)
        assert int(q.queue_ptr) == (2 * (i + 1)) % 6
    # the 4th write wrapped onto rows 0-1; rows 2-5 hold writes 1 and 2
    assert q.image_queue[:, 0].tolist() == [3, 3, 1, 1, 2, 2]
    assert torch.equal(q.text_queue, -q.image_queue)
    with pytest.raises(ValueError, match=r"model.queue_size=6 .*batch_size 4 x world size 1 = 4"):
        q.enqueue(image=torch.zeros(4, 2), text=torch.zeros(4, 2))
    q64 = FeatureQueues(["image"], dim=2, size=64)
    q64.check_batch(8, world=2)
    with pytest.raises(ValueError, match="queue_size=64"):
        q64.check_batch(12, world=2)


def test_forward_rejects_queue_size_not_divisible_by_batch():
    m = Albef(tiny_options(queue_size=6))
    with pytest.raises(ValueError, match="model.queue_size=6"):
        m(batch(4))


def test_ema_update_value_and_state_changes_only_through_the_engine_hooks(model):
    p, q = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])
    ema_update([(p, q)], 0.9)
    assert q.tolist() == pytest.approx([0.9 * 3 + 0.1 * 1, 0.9 * -1 + 0.1 * 2])

    model.train()
    online = model.vision_proj.weight.detach().clone()
    before = model.vision_proj_m.weight.detach().clone() + 0.5
    with torch.no_grad():
        model.vision_proj_m.weight.copy_(before)
    b = batch(4)
    ptr = int(model.queues.queue_ptr)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(b)
    # a training forward alone changes no state: the engine may still skip this batch (non-finite loss)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        emb = model.visual_encoder_m.forward_features(b["image"])
        feat_m = F.normalize(model.vision_proj_m(emb[:, 0]), dim=-1)
    model.commit_step()  # the engine's call once the loss is agreed finite: the momentum features are enqueued
    assert torch.allclose(model.queues.image_queue[ptr : ptr + 4], feat_m, atol=1e-6)
    assert int(model.queues.queue_ptr) == (ptr + 4) % 8
    model.commit_step()  # nothing pending any more: no second write
    assert int(model.queues.queue_ptr) == (ptr + 4) % 8
    model.after_optimizer_step()  # the EMA runs after the update
    expected = model.opts.momentum * before + (1 - model.opts.momentum) * online
    assert torch.allclose(model.vision_proj_m.weight, expected, atol=1e-7)
    model(batch(4, seed=3))
    model.discard_step()  # a skipped batch: its features never reach the queue
    model.commit_step()
    assert int(model.queues.queue_ptr) == (ptr + 4) % 8


def test_eval_forward_changes_no_state(model):
    model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(batch(4))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    model.train()


# ------------------------------------------------------------------------------------------------ whole model


def test_state_dict_round_trip_restores_queues_and_momentum_exactly(model):
    model.train()
    model(batch(4, seed=5))
    model.commit_step()
    model.after_optimizer_step()
    state = model.state_dict()
    assert {"queues.image_queue", "queues.text_queue", "queues.queue_ptr", "temp"} <= set(state)
    assert any(k.startswith("momentum.text_encoder.") for k in state)
    torch.manual_seed(123)
    other = Albef(tiny_options())
    assert not torch.equal(other.queues.image_queue, model.queues.image_queue)
    other.load_state_dict(state)
    for k, v in other.state_dict().items():
        assert torch.equal(v, state[k]), k
    # momentum twins and queues stay float32 when the model is cast to bf16 (the EMA would stall in bf16)
    other.bfloat16()
    assert other.temp.dtype == torch.bfloat16
    assert other.momentum["visual_encoder"].cls_token.dtype == torch.float32
    assert other.queues.image_queue.dtype == torch.float32


def test_forward_outputs_and_backward_reaches_every_trainable_parameter(model):
    model.train()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.temp.fill_(1.0)
    out = model({**batch(4), "step": 1, "updates_per_epoch": 4})
    assert set(out["losses"]) == {"itc", "itm", "mlm"}
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in out["losses"].values()), rel=1e-6)
    assert out["temp"].item() == pytest.approx(0.5) and out["alpha"] == pytest.approx(0.1)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(not p.requires_grad for p in model.momentum.parameters())
    with pytest.raises(TypeError, match="list of str"):
        model({"image": torch.zeros(4, 3, 16, 16), "text": tuple(TEXTS)})


def test_mlm_head_tied_to_word_embeddings_in_both_twins(model):
    assert model.mlm_head.predictions.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    twin = model.momentum["mlm_head"].predictions.decoder.weight
    assert twin is model.momentum["text_encoder"].embeddings.word_embeddings.weight
    untied = Albef(tiny_options(tie_mlm_head=False))
    assert untied.mlm_head.predictions.decoder.weight is not untied.text_encoder.embeddings.word_embeddings.weight


# ------------------------------------------------------------------------------------------------ fusion encoder


def test_pretrained_text_weights_load_into_fusion_encoder(model):
    reference = build_text_encoder(model.opts.text).state_dict()
    own = model.text_encoder.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "encoder.layer.1.output.dense.weight"):  # fmt: skip
        assert torch.equal(own[key], reference[key]), key
    assert model.text_encoder.fusion_layer == 1
    assert hasattr(model.text_encoder.encoder.layer[1], "crossattention")
    assert not hasattr(model.text_encoder.encoder.layer[0], "crossattention")


def test_fusion_pairs_follow_albef_rule_or_concatenate():
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32)
    enc = FusionBert(cfg, fusion_layer=2, encoder_width=8).eval()
    ids = torch.randint(1, 50, (2, 6))
    img0, img1 = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    enc.set_save_attention(True)
    enc(ids, image_embeds=[img0, img1])
    assert enc.attention_maps[2].shape == (2, 2, 6, 5)  # layer 2: image (2 - 2) % 2 = 0
    assert enc.attention_maps[3].shape == (2, 2, 6, 3)  # layer 3: image 1
    enc(ids, image_embeds=[img0, img1], pair_mode="concat")
    assert enc.attention_maps[2].shape[-1] == enc.attention_maps[3].shape[-1] == 8
    # a masked image token receives no attention
    enc(ids, image_embeds=img0, image_atts=torch.tensor([[1, 1, 1, 1, 0]] * 2))
    assert enc.attention_maps[2][..., 4].abs().max() == 0
    with pytest.raises(ValueError, match="fusion_layer=5"):
        FusionBert(cfg, fusion_layer=5, encoder_width=8)


def test_fuse_gradcam_maps_and_gradients(model):
    model.eval()
    enc = model.text_encoder
    tokens = model.tokenize(TEXTS[:2])
    img = torch.randn(2, 5, 192, requires_grad=True)
    sdpa = model.fuse(img, tokens)
    enc.set_save_attention(True)
    try:
        fused = model.fuse(img, tokens)
        assert torch.allclose(fused, sdpa, atol=1e-5)  # the eager kernel (needed for maps) computes the same
        maps = enc.attention_maps[1]
        assert maps.shape == (2, enc.config.num_attention_heads, tokens.input_ids.shape[1], 5)
        assert torch.allclose(maps.sum(-1), torch.ones_like(maps.sum(-1)), atol=1e-5)
        model.itm_logits(fused)[:, 1].sum().backward()
        assert enc.attention_grads[1].shape == maps.shape and enc.attention_grads[1].abs().sum() > 0
        assert img.grad is not None and img.grad.abs().sum() > 0
    finally:
        enc.set_save_attention(False)
    assert enc.attention_maps == {}
    # (text_embeds, mask) from encode_text gives the same result as raw tokens
    embeds, _ = model.encode_text(tokens)
    assert torch.allclose(model.fuse(img, (embeds, tokens.attention_mask)), sdpa, atol=1e-6)
    # the momentum twin hooks into its own maps, not the online encoder's
    model.momentum["text_encoder"].set_save_attention(True)
    model.momentum["text_encoder"](tokens.input_ids, tokens.attention_mask, image_embeds=img.detach())
    assert enc.attention_maps == {} and 1 in model.momentum["text_encoder"].attention_maps
    model.momentum["text_encoder"].set_save_attention(False)


def test_queue_write_wraps_when_a_batch_size_change_unaligns_the_pointer():
    q = FeatureQueues(["image"], dim=1, size=4)
    for value, n in ((1.0, 1), (2.0, 2), (3.0, 2)):
        q.enqueue(image=torch.full((n, 1), value))
    assert q.image_queue[:, 0].tolist() == [3, 2, 2, 3] and int(q.queue_ptr) == 1


def test_text_pool_mean_hands_on_the_token_mean_as_cls_in_text_and_multimodal_modes():
    # minilm (mean-pooled sentence-transformers tower): its [CLS] after 2 of its layers is one vector for every
    # caption, which is why the CPU recipes set text_pool: mean (ALBEF's ITC and ITM read that position)
    torch.manual_seed(0)
    opts = dict(text=TextOptions(config={"num_hidden_layers": 3}), fusion_layer=2)
    cls_model = Albef(tiny_options(**opts)).eval()
    mean_model = Albef(tiny_options(**opts, text_pool="mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    tokens = cls_model.tokenize(TEXTS)
    mask = tokens.attention_mask.float()
    with torch.no_grad():
        plain, _ = cls_model.encode_text(tokens)
        pooled, feat = mean_model.encode_text(tokens)
        hand = torch.stack([plain[i, : int(mask[i].sum())].mean(0) for i in range(len(TEXTS))])
        assert torch.allclose(pooled[:, 0], hand, atol=1e-5)
        assert torch.equal(pooled[:, 1:], plain[:, 1:])
        assert torch.allclose(feat, F.normalize(mean_model.text_proj(hand), dim=-1), atol=1e-5)
        cos = F.normalize(plain[:, 0], dim=-1) @ F.normalize(plain[:, 0], dim=-1).T
        assert float(cos.min()) > 0.99  # the degenerate [CLS]
        cos = F.normalize(hand, dim=-1) @ F.normalize(hand, dim=-1).T
        assert float(cos.min()) < 0.95
        # one pass through text + fusion layers equals text mode then fusion mode
        images, _ = mean_model.encode_image(batch()["image"])
        one = mean_model.text_encoder(tokens.input_ids, tokens.attention_mask, image_embeds=images)
        two = mean_model.fuse(images, tokens)
        assert torch.allclose(one, two, atol=1e-5)
        assert not torch.allclose(one, cls_model.fuse(images, tokens), atol=1e-3)
