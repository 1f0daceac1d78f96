"""ViLT: ITM negatives, whole-word MLM masking, losses against manual cross-entropy, MixGen re-tokenization."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launch.config import ConfigError
from pretrain.config import MixGenConfig, resolve_model_options
from pretrain.mixgen import apply_mixgen
from pretrain.models import get
from pretrain.models.encoders import VisionOptions
from pretrain.models.vilt import ViltOptions
from pretrain.objectives import IGNORE, ipot, itm_negatives, wpa_distance
from pretrain.objectives import mask_words as mask_tokens

TEXTS = [
    "a dog runs on the grass",
    "two cats sleeping on a sofa",
    "a red car parked near an unbelievably tall building",
    "a man riding a horse",
]


def _opts(**kw) -> ViltOptions:
    base = dict(
        vision=VisionOptions(name="vit_small_patch32_384", kwargs={"patch_size": 8}),
        text={"name": "minilm", "pretrained": False},
        image_size=32,
        depth=2,
    )
    base.update(kw)
    return resolve_model_options({"name": "vilt", **base})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    _, build = get("vilt")
    m = build(_opts(wpa=True, wpa_iterations=5))
    return m.eval()


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_itm_negatives_hand_check() -> None:
    labels, index = itm_negatives(7, _gen(1))
    g = _gen(1)
    perm = torch.randperm(7, generator=g)
    offsets = torch.randint(1, 7, (7,), generator=g)
    expected = torch.tensor([1, 1, 1, 0, 0, 0, 0])[perm]  # B//2 positives, then shuffled (ViLT's layout)
    assert torch.equal(labels, expected)
    for i in range(7):
        if labels[i] == 1:
            assert index[i] == i
        else:
            assert index[i] == (i + offsets[i]) % 7 and index[i] != i
    one_l, one_i = itm_negatives(1, _gen(0))
    assert one_l.tolist() == [1] and one_i.tolist() == [0]


def _synthetic_ids(rows: int, length: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [CLS] words(1-3 pieces) [SEP] [PAD]...; word ids -1 on specials and padding."""
    ids = torch.zeros(rows, length, dtype=torch.long)
    wids = torch.full((rows, length), -1, dtype=torch.long)
    for r in range(rows):
        n = int(torch.randint(length // 2, length, (1,), generator=gen))
        ids[r, 0], ids[r, n - 1] = 101, 102
        pos, word = 1, 0
        while pos < n - 1:
            pieces = min(int(torch.randint(1, 4, (1,), generator=gen)), n - 1 - pos)
            ids[r, pos : pos + pieces] = torch.randint(1000, 30000, (pieces,), generator=gen)
            wids[r, pos : pos + pieces] = word
            pos, word = pos + pieces, word + 1
    return ids, wids


def test_mask_tokens_statistics() -> None:
    ids, wids = _synthetic_ids(600, 40, _gen(0))
    masked_ids, labels = mask_tokens(
        ids, wids, mask_token_id=103, vocab_size=30522, probability=0.15, generator=_gen(5)
    )
    picked = labels != IGNORE
    cand = wids >= 0
    assert not picked[~cand].any(), "specials and padding are never masked"
    assert torch.equal(labels[picked], ids[picked]) and torch.equal(masked_ids[~picked], ids[~picked])
    rate = picked.sum().item() / cand.sum().item()
    assert abs(rate - 0.15) < 0.015, rate
    # whole words: all pieces of a word share the decision
    for r in range(ids.shape[0]):
        for w in wids[r][wids[r] >= 0].unique():
            flags = picked[r][wids[r] == w]
            assert bool(flags.all()) or not bool(flags.any())
    # 80 / 10 / 10
    n = picked.sum().item()
    as_mask = (masked_ids[picked] == 103).sum().item() / n
    kept = (masked_ids[picked] == ids[picked]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.025 and abs(1 - as_mask - kept - 0.1) < 0.025
    # every row with words predicts something
    assert bool(picked.any(1).all())


def test_tokenize_word_ids_and_mixgen_truncation(model) -> None:
    tok = model.tokenize(["an unbelievably tall tower", "a cat"])
    ids = tok["input_ids"][0].tolist()
    pieces = model.tokenizer.convert_ids_to_tokens(ids)
    wid = tok["word_ids"][0].tolist()
    # specials get -1; the word-pieces of one word share an id
    assert wid[0] == -1 and wid[pieces.index("[SEP]")] == -1
    cont = [i for i, p in enumerate(pieces) if p.startswith("##")]
    assert cont and all(wid[i] == wid[i - 1] >= 0 for i in cont)
    assert tok["attention_mask"][1].sum().item() == 4 and tok["word_ids"][1, 4:].eq(-1).all()

    # MixGen concatenation of two 30-word captions: re-tokenized, cut at max_text_len with [SEP] last
    long_a = " ".join(["red"] * 30)
    long_b = " ".join(["blue"] * 30)
    batch = {"image": torch.zeros(4, 3, 32, 32), "text": [long_a, long_b, "a dog", "a cat"]}
    mixed = apply_mixgen(batch, MixGenConfig(ratio=0.5), seed=0, step=0, rank=0)
    assert mixed["text"][0] == long_a + " a dog" and mixed["text"][1] == long_b + " a cat"
    mixed["text"][0] = long_a + " " + long_b
    tok = model.tokenize(mixed["text"])
    limit = model.opts.max_text_len
    assert tok["input_ids"].shape[1] == limit
    row = model.tokenizer.convert_ids_to_tokens(tok["input_ids"][0].tolist())
    assert row[0] == "[CLS]" and row[-1] == "[SEP]" and row.count("red") == 30 and row.count("blue") == limit - 32
    assert tok["truncated"].tolist() == [True, False, False, False]
    assert tok["input_ids"][1].tolist()[:34] == model.tokenizer(mixed["text"][1])["input_ids"]


def test_losses_match_manual_cross_entropy(model) -> None:
    torch.manual_seed(3)
    images = torch.randn(4, 3, 32, 32)
    batch = {"image": images, "text": list(TEXTS)}
    torch.manual_seed(11)
    out = model(batch)
    # replay the same draws: ITM labels/partners first, then the MLM masks
    torch.manual_seed(11)
    labels, index = itm_negatives(4)
    assert 0 < labels.sum() < 4
    tokens = model.tokenize(TEXTS)
    masked, mlm_labels = mask_tokens(
        tokens["input_ids"], tokens["word_ids"], mask_token_id=model.tokenizer.mask_token_id, vocab_size=30522
    )
    with torch.no_grad():
        logits = model.itm_head(model.fuse(images[index], tokens)["pooled"])
        itm = -logits.log_softmax(-1)[torch.arange(4), labels].mean()
        feats = model.fuse(images, {**tokens, "input_ids": masked})["text_feats"]
        pick = mlm_labels != IGNORE
        lp = model.mlm_head(feats[pick]).log_softmax(-1)
        mlm = -lp[torch.arange(lp.shape[0]), mlm_labels[pick]].mean()
        # swapping matters: with the unswapped images the ITM loss differs
        unswapped = model.itm_head(model.fuse(images, tokens)["pooled"])
    assert torch.allclose(out["losses"]["itm"], itm, atol=1e-6)
    assert torch.allclose(out["losses"]["mlm"], mlm, atol=1e-6)
    # the swap matters (an untrained ITM head barely separates inputs, hence the small threshold)
    assert (unswapped - logits).abs().max() > 1e-4
    assert not torch.allclose(F.cross_entropy(unswapped, labels), itm, atol=1e-6)
    expected = itm + mlm + 0.1 * out["losses"]["wpa"]
    assert torch.allclose(out["loss"], expected, atol=1e-5)
    assert math.isclose(float(out["stats"]["text_truncated"]), 0.0)


def test_backward_reaches_every_trained_part(model) -> None:
    model.train()
    model.zero_grad()
    out = model({"image": torch.randn(4, 3, 32, 32), "text": list(TEXTS)})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for name in (
        "transformer.patch_embed.proj.weight",
        "transformer.blocks.0.attn.qkv.weight",
        "transformer.blocks.1.mlp.fc2.weight",
        "text_embeddings.word_embeddings.weight",
        "type_embeddings.weight",
        "pooler.0.weight",
        "itm_head.weight",
        "mlm_head.3.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    model.zero_grad()
    model.eval()


def test_fuse_one_or_two_images_and_attentions(model) -> None:
    images = torch.randn(2, 3, 32, 32)
    tokens = model.tokenize(TEXTS[1:3])  # different lengths: padding to check
    with torch.no_grad():
        one = model.fuse(images, tokens, output_attentions=True)
        fast = model.fuse(images, tokens)
        from_embeds = model.fuse(model.encode_image(images), tokens)
        two = model.fuse([images, images.flip(0)], tokens)
    length = tokens["input_ids"].shape[1]
    n_img = 1 + (32 // 8) ** 2
    assert one["pooled"].shape == (2, 384) and one["image_feats"].shape == (2, n_img, 384)
    assert len(one["attentions"]) == 2 and one["attentions"][0].shape == (2, 6, length + n_img, length + n_img)
    assert torch.allclose(one["attentions"][0].sum(-1), torch.ones(2, 6, length + n_img), atol=1e-5)
    pad = ~tokens["attention_mask"].bool()
    assert (
        one["attentions"][0][:, :, :, :length][pad[:, None, None, :].expand(-1, 6, length + n_img, -1)].abs().max()
        < 1e-6
    )
    assert torch.allclose(one["tokens"], fast["tokens"], atol=1e-4)  # unfused path == timm's fused attention
    assert torch.allclose(from_embeds["pooled"], fast["pooled"], atol=1e-6)
    assert two["pooled"].shape == (2, 768) and torch.allclose(two["pooled"][:, :384], fast["pooled"], atol=1e-6)
    assert model.encode_text(TEXTS[1:3]).shape == (2, length, 384)
    with pytest.raises(ValueError, match="one or two images"):
        model.fuse([images] * 3, tokens)


def test_ipot_plan_and_wpa_distance() -> None:
    cost = 1.0 - torch.eye(4).unsqueeze(0)  # matching token k to patch k is free
    valid = torch.ones(1, 4, dtype=torch.bool)
    plan = ipot(cost, valid, valid, beta=0.5, iterations=50)
    assert torch.allclose(plan.sum(2), torch.full((1, 4), 0.25), atol=1e-4)
    assert torch.allclose(plan.sum(1), torch.full((1, 4), 0.25), atol=1e-4)
    assert plan[0].diagonal().sum() > 0.99
    # padded text rows carry no mass; aligned features are closer than shuffled ones
    row_valid = torch.tensor([[True, True, True, False]])
    plan = ipot(cost, row_valid, valid)
    assert plan[0, 3].abs().sum() == 0 and torch.allclose(plan.sum(), torch.tensor(1.0), atol=1e-4)
    feats = torch.randn(1, 4, 16)
    d_same = wpa_distance(feats, feats.clone(), valid)
    d_other = wpa_distance(feats, torch.randn(1, 4, 16), valid)
    assert d_same.item() < 1e-3 < d_other.item()


def test_options_and_pretrained_embeddings() -> None:
    opts = _opts(text={"name": "minilm", "pretrained": True}, depth=1)
    assert isinstance(opts, ViltOptions) and opts.max_text_len == 40 and opts.whole_word_masking
    _, build = get("vilt")
    m = build(opts)
    from pretrain.models.encoders import TextOptions, build_text_encoder

    ref = build_text_encoder(TextOptions()).embeddings
    assert torch.equal(m.text_embeddings.word_embeddings.weight, ref.word_embeddings.weight)
    assert torch.equal(m.text_embeddings.position_embeddings.weight, ref.position_embeddings.weight[:40])
    with pytest.raises(ConfigError, match="hidden size 384"):
        build(_opts(text={"name": "minilm", "pretrained": True}, hidden_size=192, num_heads=3, depth=1))
    with pytest.raises(ConfigError, match="model.mlm_probability"):
        build(_opts(mlm_probability=1.5))
    with pytest.raises(ConfigError, match="unknown|did you mean|not a field|wpa_wieght"):
        _opts(wpa_wieght=0.1)


@pytest.mark.parametrize("recipe", ["vilt_tiny", "vilt"])
def test_recipes_model_sections(recipe: str) -> None:
    import yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / f"{recipe}.yaml"
    raw = yaml.safe_load(path.read_text())
    opts = resolve_model_options(raw["model"])
    assert isinstance(opts, ViltOptions) and opts.image_size == raw["data"]["image_size"]
    assert opts.max_text_len == 40 and opts.mlm_probability == 0.15 and opts.whole_word_masking
    if recipe == "vilt":
        assert opts.vision.name == "vit_base_patch32_384" and not opts.text.pretrained
        tc = raw["train"]
        assert tc["lr"] == 1e-4 and tc["weight_decay"] == 0.01 and tc["warmup_steps"] == tc["max_steps"] // 10
        assert raw["data"]["batch_size"] * tc["grad_accum"] * 8 == 4096
