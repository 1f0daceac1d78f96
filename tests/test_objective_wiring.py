"""Golden tests of how each model wires its objectives: every loss a training forward reports is recomputed here
from the model's own encoders (online and momentum twins, queues, fusion encoder, heads) with the formulas written
out, and compared by value. Each test also checks that the value it guards would differ under the wrong wiring
(online instead of momentum targets, no queue, uniform instead of hard negatives, the MLM teacher on online image
tokens, no text padding mask in TCL's local MI, a flipped word-patch alignment sign), so it can fail.

Tiny models with dropout off and fixed seeds; the momentum twins are perturbed away from the online weights so
that online and momentum features differ as they do after training.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import resolve_model_options
from pretrain.models import get
from pretrain.models.albef import Albef, AlbefOptions
from pretrain.models.encoders import TextOptions, VisionOptions
from pretrain.models.tcl import Tcl, TclOptions
from pretrain.objectives import IGNORE, ipot

NO_DROPOUT = {"num_hidden_layers": 2, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
TEXTS = ["a red circle", "two blue squares on the left of a big table", "a green triangle", "a cat"]
TOL = dict(rel=1e-5, abs=1e-6)


def _perturb_momentum(model: Albef, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.momentum.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _albef(cls=Albef, opts_cls=AlbefOptions, **kw) -> Albef:
    torch.manual_seed(0)
    base = dict(
        vision=VisionOptions(name="vit_tiny_patch16_224", kwargs={"depth": 1, "patch_size": 8}),
        text=TextOptions(config=dict(NO_DROPOUT)),
        image_size=32,
        embed_dim=16,
        queue_size=8,
        mlm_probability=0.5,
        temp=0.1,
    )
    base.update(kw)
    model = cls(opts_cls(**base)).train()
    _perturb_momentum(model)
    return model


def _batch(views: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"image": torch.randn(4, 3, 32, 32, generator=g), "text": list(TEXTS)}
    if views == 2:
        out["image2"] = torch.randn(4, 3, 32, 32, generator=g)
    return out


@torch.no_grad()
def _features(model: Albef, batch: dict) -> dict:
    """Online and momentum features straight from the model's modules (not through its forward)."""
    tokens = model.tokenize(batch["text"])
    m = model.momentum
    image_embeds = model.visual_encoder.forward_features(batch["image"])
    text_embeds = model.text_encoder(tokens.input_ids, tokens.attention_mask, mode="text")
    momentum_view = batch.get("image2", batch["image"])
    image_embeds_m = m["visual_encoder"].forward_features(momentum_view)
    text_hidden_m = m["text_encoder"](tokens.input_ids, tokens.attention_mask, mode="text")
    return {
        "tokens": tokens,
        "image_embeds": image_embeds,
        "text_embeds": text_embeds,
        "image_embeds_m": image_embeds_m,
        "text_hidden_m": text_hidden_m,
        "img": F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1),
        "txt": F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1),
        "img_m": F.normalize(m["vision_proj"](image_embeds_m[:, 0]), dim=-1),
        "txt_m": F.normalize(m["text_proj"](text_hidden_m[:, 0]), dim=-1),
        "q_img": model.queues.image_queue.clone(),
        "q_txt": model.queues.text_queue.clone(),
    }


def _ref_itc(f: dict, temp: float, alpha: float, *, targets_from: str = "momentum", queue: bool = True) -> float:
    """ALBEF's ITC written out: online rows, [momentum batch; queue] columns, distilled soft targets."""
    txt_all = torch.cat([f["txt_m"], f["q_txt"]]) if queue else f["txt_m"]
    img_all = torch.cat([f["img_m"], f["q_img"]]) if queue else f["img_m"]
    bsz = f["img"].shape[0]

    def one(rows: torch.Tensor, teacher: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(rows @ cols.T / temp, dim=1)
        onehot = torch.zeros_like(logp)
        onehot[:, :bsz] = torch.eye(bsz)
        target = alpha * torch.softmax(teacher @ cols.T / temp, dim=1) + (1 - alpha) * onehot
        return -(target * logp).sum(1).mean()

    t_img = f["img_m"] if targets_from == "momentum" else f["img"]
    t_txt = f["txt_m"] if targets_from == "momentum" else f["txt"]
    return float((one(f["img"], t_img, txt_all) + one(f["txt"], t_txt, img_all)) / 2)


class _Capture:
    """Wraps a function of a module, recording its return values (the random draws a forward makes)."""

    def __init__(self, monkeypatch, module, name: str) -> None:
        self.calls: list = []
        inner = getattr(module, name)

        def wrapper(*args, **kwargs):
            out = inner(*args, **kwargs)
            self.calls.append(out)
            return out

        monkeypatch.setattr(module, name, wrapper)


# ================================================================================================ ALBEF
def test_albef_itc_uses_momentum_targets_and_the_queue():
    model = _albef()
    b = _batch()
    f = _features(model, b)
    out = model(b)
    model.discard_step()
    alpha, temp = model.opts.alpha, model.opts.temp
    expected = _ref_itc(f, temp, alpha)
    assert float(out["losses"]["itc"]) == pytest.approx(expected, **TOL)
    # the wirings this guards are distinguishable at this tolerance
    assert abs(_ref_itc(f, temp, alpha, targets_from="online") - expected) > 1e-3
    assert abs(_ref_itc(f, temp, alpha, queue=False) - expected) > 1e-3


def test_albef_itm_draws_the_dominant_hard_negative_from_the_similarities(monkeypatch):
    model = _albef(temp=0.001)  # a peaked softmax: the most similar other sample is drawn with p ~ 1
    with torch.no_grad():
        model.itm_head.weight.mul_(100.0)  # a random ITM head barely separates pairs: make the pairing visible
    b = _batch(seed=1)
    f = _features(model, b)
    sim_i2t = f["img"] @ f["txt_m"].T  # online rows against the momentum features of the batch (ALBEF)
    sim_t2i = f["txt"] @ f["img_m"].T
    eye = torch.eye(4, dtype=torch.bool)
    for sim in (sim_i2t, sim_t2i):
        top2 = sim.masked_fill(eye, -2.0).topk(2, dim=1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 0.012  # at temp 0.001 another draw has p < exp(-12)
    neg_text = sim_i2t.masked_fill(eye, -2.0).argmax(1)
    neg_image = sim_t2i.masked_fill(eye, -2.0).argmax(1)

    import pretrain.models.albef as albef_module

    drawn = _Capture(monkeypatch, albef_module, "hard_negative_itm")
    torch.manual_seed(0)
    out = model(b)
    model.discard_step()
    assert drawn.calls[0].neg_image.tolist() == neg_image.tolist()  # for text b: the image most like it
    assert drawn.calls[0].neg_text.tolist() == neg_text.tolist()  # for image b: the text most like it
    mask = f["tokens"].attention_mask
    with torch.no_grad():

        def itm(neg_image: torch.Tensor, neg_text: torch.Tensor) -> float:
            images = torch.cat([f["image_embeds"], f["image_embeds"][neg_image], f["image_embeds"]])
            texts = torch.cat([f["text_embeds"], f["text_embeds"], f["text_embeds"][neg_text]])
            masks = torch.cat([mask, mask, mask[neg_text]])
            logits = model.itm_head(model.fuse(images, (texts, masks))[:, 0])
            labels = torch.tensor([1] * 4 + [0] * 8)
            return float(-torch.log_softmax(logits, 1)[torch.arange(12), labels].mean())

        expected = itm(neg_image, neg_text)
        # any other choice of negatives scores differently (here: each row's least similar sample)
        easy_text = sim_i2t.masked_fill(eye, 2.0).argmin(1)
        easy_image = sim_t2i.masked_fill(eye, 2.0).argmin(1)
        assert abs(itm(easy_image, easy_text) - expected) > 1e-4
    assert float(out["losses"]["itm"]) == pytest.approx(expected, **TOL)


def test_albef_mlm_student_and_momentum_teacher_inputs(monkeypatch):
    import pretrain.models.albef as albef_module

    model = _albef()
    masks = _Capture(monkeypatch, albef_module, "mask_tokens")
    b = _batch(seed=2)
    f = _features(model, b)
    out = model(b)
    model.discard_step()
    ids, labels = masks.calls[0]
    keep = labels != IGNORE
    assert keep.sum() >= 3
    alpha = model.opts.alpha
    mask = f["tokens"].attention_mask
    m = model.momentum
    with torch.no_grad():
        student = model.mlm_head(model.text_encoder(ids, mask, image_embeds=f["image_embeds"], mode="multimodal"))

        def mlm(teacher_image_embeds: torch.Tensor) -> float:
            hidden_m = m["text_encoder"](ids, mask, image_embeds=teacher_image_embeds, mode="multimodal")
            teacher = torch.softmax(m["mlm_head"](hidden_m)[keep], dim=-1)
            logp = torch.log_softmax(student[keep], dim=-1)
            ce = -logp[torch.arange(int(keep.sum())), labels[keep]].mean()
            distill = -(teacher * logp).sum(-1).mean()
            return float((1 - alpha) * ce + alpha * distill)

        expected = mlm(f["image_embeds_m"])  # the teacher is the momentum model on the momentum image tokens
        assert abs(mlm(f["image_embeds"]) - expected) > 1e-4
    assert float(out["losses"]["mlm"]) == pytest.approx(expected, **TOL)
    assert float(out["loss"].detach()) == pytest.approx(float(sum(out["losses"].values())), **TOL)


def test_albef_alpha_follows_the_update_counted_ramp():
    model = _albef()
    assert model.alpha({"step": 3, "updates_per_epoch": 6}) == pytest.approx(0.2)
    assert model.alpha({"step": 9, "updates_per_epoch": 6}) == pytest.approx(0.4)
    assert model.alpha({}) == pytest.approx(0.4)


# ================================================================================================ TCL
def _ref_global_local(local: torch.Tensor, glob: torch.Tensor, mask: torch.Tensor, temp: float) -> float:
    """TCL's in-batch global-to-local InfoNCE with explicit loops."""
    bsz, n, _ = local.shape
    per_sample = []
    for b in range(bsz):
        terms = []
        negatives = [
            float(glob[b] @ local[o, j]) / temp for o in range(bsz) if o != b for j in range(n) if mask[o, j]
        ]
        for j in range(n):
            if not mask[b, j]:
                continue
            pos = float(local[b, j] @ glob[b]) / temp
            logits = torch.tensor([pos] + negatives)
            terms.append(float(torch.logsumexp(logits, 0)) - pos)
        per_sample.append(sum(terms) / len(terms))
    return sum(per_sample) / bsz


def test_tcl_imc_and_lmi_from_the_second_view_with_text_padding_masked():
    model = _albef(Tcl, TclOptions, lmi_grid=2)
    b = _batch(views=2, seed=3)
    f = _features(model, b)
    out = model(b)
    model.discard_step()
    temp, m = model.opts.temp, model.momentum
    assert float(out["losses"]["itc"]) == pytest.approx(_ref_itc(f, temp, model.opts.alpha), **TOL)

    def ce_diag(rows: torch.Tensor, cols: torch.Tensor) -> float:
        logp = torch.log_softmax(rows @ cols.T / temp, dim=1)
        return float(-logp[torch.arange(4), torch.arange(4)].mean())

    imc = (
        ce_diag(f["img"], torch.cat([f["img_m"], f["q_img"]])) + ce_diag(f["txt"], torch.cat([f["txt_m"], f["q_txt"]]))
    ) / 2
    assert float(out["losses"]["imc"]) == pytest.approx(imc, **TOL)

    with torch.no_grad():
        patches = F.normalize(m["vision_proj"](f["image_embeds_m"][:, 1:]), dim=-1)  # [4, 16, D] on a 4x4 grid
        grid = patches.reshape(4, 4, 4, -1)
        image_local = torch.stack(
            [grid[:, r : r + 2, c : c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], dim=1
        )  # 2x2 average pooling, row-major
        text_local = F.normalize(m["text_proj"](f["text_hidden_m"][:, 1:]), dim=-1)
    text_mask = f["tokens"].attention_mask[:, 1:].bool()
    assert not text_mask.all()  # captions of different lengths: padding present
    lmi_i = _ref_global_local(image_local, f["img"], torch.ones(4, 4, dtype=torch.bool), temp)
    lmi_t = _ref_global_local(text_local, f["txt"], text_mask, temp)
    expected = (lmi_i + lmi_t) / 2
    unmasked = (lmi_i + _ref_global_local(text_local, f["txt"], torch.ones_like(text_mask), temp)) / 2
    assert abs(unmasked - expected) > 1e-3
    assert float(out["losses"]["lmi"]) == pytest.approx(expected, **TOL)
    o = model.opts
    total = o.itc_weight * out["losses"]["itc"] + o.imc_weight * out["losses"]["imc"]
    total = total + o.lmi_weight * out["losses"]["lmi"] + out["losses"]["itm"] + out["losses"]["mlm"]
    assert float(out["loss"].detach()) == pytest.approx(float(total), **TOL)


# ================================================================================================ ViLT
def test_vilt_word_patch_alignment_distance_and_sign(monkeypatch):
    import pretrain.models.vilt as vilt_module

    opts = _vilt_options()
    torch.manual_seed(0)
    model = get("vilt")[1](opts).eval()
    pairs = _Capture(monkeypatch, vilt_module, "itm_negatives")
    g = torch.Generator().manual_seed(4)
    images = torch.randn(4, 3, 32, 32, generator=g)
    out = model({"image": images, "text": list(TEXTS)})
    labels, index = pairs.calls[0]
    assert 0 < int(labels.sum()) < 4
    tokens = model.tokenize(TEXTS)
    with torch.no_grad():
        fused = model.fuse(images[index], tokens)
        specials = torch.tensor(model.tokenizer.all_special_ids)
        text_valid = tokens["attention_mask"].bool() & ~torch.isin(tokens["input_ids"], specials)
        text = F.normalize(fused["text_feats"], dim=-1)
        patches = F.normalize(fused["image_feats"][:, 1:], dim=-1)  # no image [CLS]
        cost = 1 - text @ patches.transpose(1, 2)
        plan = ipot(cost, text_valid, torch.ones(patches.shape[:2], dtype=torch.bool), 0.5, opts.wpa_iterations)
        distance = (cost * plan).sum(dim=(1, 2))
    pos = labels == 1
    expected = float((distance[pos].sum() - distance[~pos].sum()) / 4)  # aligned pairs must be pulled closer
    assert abs(expected) > 1e-4  # a flipped sign is distinguishable
    assert float(out["losses"]["wpa"]) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _vilt_options():
    return resolve_model_options(
        {
            "name": "vilt",
            "vision": {"name": "vit_small_patch32_384", "kwargs": {"patch_size": 8}},
            "text": {"name": "minilm", "pretrained": False},
            "image_size": 32,
            "depth": 2,
            "drop": 0.0,
            "wpa": True,
            "wpa_iterations": 5,
        }
    )


def test_hard_negative_draw_survives_a_dominant_diagonal_at_low_temperature():
    # at ALBEF's minimum temperature the positive's weight dwarfs the others: softmax-then-zero underflows every
    # candidate to 0 in float32 and the draw would silently become uniform
    from pretrain.objectives import sample_negatives

    sim = torch.tensor([[0.26, 0.02, 0.03, -0.03], [0.02, 0.26, -0.03, 0.03], [0.03, -0.03, 0.26, 0.02],
                        [-0.03, 0.03, 0.02, 0.26]]) / 0.001  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_negatives(sim, generator=g).tolist() == [2, 3, 0, 1]
