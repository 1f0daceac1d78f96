"""Defaults that follow the official ALBEF/TCL code (see the deviation table in docs/models.md): 25-token
pretraining captions, TCL's extra view augmentations, the MLM head from a pretrained BERT head, MLM masking that
excludes only [PAD]/[CLS] (and the [SEP] transformers appends, which ALBEF's tokenizer never writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.transforms import ColorAugment, train_transform
from launch.config import load_config
from pretrain.config import PretrainConfig
from pretrain.models.albef import Albef, AlbefOptions
from pretrain.models.encoders import TextOptions, build_tokenizer, mlm_excluded_ids
from pretrain.objectives import IGNORE, mask_tokens
from tests.test_albef import tiny_options

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "recipe", ["albef", "albef_tiny", "albef_tiny_pretrained", "tcl", "tcl_tiny", "tcl_tiny_pretrained"]
)
def test_albef_and_tcl_recipes_tokenize_pretraining_captions_at_25(recipe):
    import yaml

    # the raw YAML: the full recipes name bert-base-uncased, which an offline config check cannot resolve
    raw = yaml.safe_load((REPO / f"configs/pretrain/{recipe}.yaml").read_text())
    assert raw["model"]["text"]["max_length"] == 25
    assert raw["data"]["transform"] == ("tcl" if recipe.startswith("tcl") else "albef")
    assert AlbefOptions().text.max_length == 25  # also the option's default


def test_mlm_masking_excludes_only_pad_cls_and_the_appended_sep():
    tok = build_tokenizer("minilm")
    excluded = mlm_excluded_ids(tok, AlbefOptions().mlm_exclude)
    assert excluded == sorted({tok.pad_token_id, tok.cls_token_id, tok.sep_token_id})
    assert Albef(tiny_options()).special_ids == excluded  # what the model's MLM uses
    row = [tok.cls_token_id, 2000, tok.unk_token_id, tok.mask_token_id, 2001, tok.sep_token_id, tok.pad_token_id]
    ids = torch.tensor([row])
    g = torch.Generator().manual_seed(0)
    _, labels = mask_tokens(ids, vocab_size=len(tok), mask_token_id=tok.mask_token_id, special_ids=excluded,
                            probability=1.0, generator=g)  # fmt: skip
    selected = (labels[0] != IGNORE).tolist()
    # [UNK] and a literal [MASK] in a caption are ordinary candidates, as in ALBEF
    assert selected == [False, True, True, True, True, False, False]
    with pytest.raises(ValueError, match="mlm_exclude"):
        mlm_excluded_ids(tok, ["pad", "bos"])


def test_mlm_head_starts_from_the_pretrained_bert_head(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    tok = build_tokenizer("minilm")
    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    bert = BertForMaskedLM(cfg)
    with torch.no_grad():
        bert.cls.predictions.transform.dense.weight.normal_(0.0, 1.0)
        bert.cls.predictions.bias.uniform_(-1.0, 1.0)
    folder = tmp_path / "bert_mlm"
    bert.save_pretrained(folder)
    tok.save_pretrained(folder)
    model = Albef(tiny_options(text=TextOptions(name=str(folder), config={"num_hidden_layers": 2})))
    assert model.mlm_head_pretrained
    head = model.mlm_head.predictions
    torch.testing.assert_close(head.transform.dense.weight, bert.cls.predictions.transform.dense.weight)
    torch.testing.assert_close(head.transform.LayerNorm.weight, bert.cls.predictions.transform.LayerNorm.weight)
    torch.testing.assert_close(head.decoder.bias, bert.cls.predictions.bias)
    torch.testing.assert_close(head.decoder.weight, bert.bert.embeddings.word_embeddings.weight)  # tied
    # the momentum twin starts equal to the loaded head
    torch.testing.assert_close(model.mlm_head_m.predictions.transform.dense.weight, head.transform.dense.weight)
    # the offline minilm sentence encoder carries no MLM head: random init, reported as such
    assert not Albef(tiny_options()).mlm_head_pretrained


def _colourful(size: int = 24) -> Image.Image:
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_tcl_colour_augmentation_probabilities_and_determinism():
    aug = ColorAugment()
    img = _colourful()
    gray = changed = 0
    n = 300
    for i in range(n):
        out = np.asarray(aug(img, torch.Generator().manual_seed(i)), dtype=np.int16)
        if (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all():
            gray += 1
        if np.abs(out - np.asarray(img, dtype=np.int16)).max() > 0:
            changed += 1
    assert abs(gray / n - 0.2) < 0.07  # RandomGrayscale(p=0.2)
    # unchanged only when neither jitter (0.8), grayscale (0.2) nor blur (0.5) applies: 0.2 * 0.8 * 0.5 = 0.08
    assert abs((n - changed) / n - 0.08) < 0.05
    a = aug(img, torch.Generator().manual_seed(7))
    b = aug(img, torch.Generator().manual_seed(7))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    tf = train_transform(16, (0.2, 1.0), False, color=True)
    assert tf.color is not None and train_transform(16).color is None


def test_loader_builds_the_tcl_transform_for_transform_tcl():
    from pretrain.data import _make_transform

    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tcl_tiny.yaml", [], check_paths=False).data
    assert _make_transform(cfg, True).color is not None
    cfg_albef = load_config(PretrainConfig, REPO / "configs/pretrain/albef_tiny.yaml", [], check_paths=False).data
    assert _make_transform(cfg_albef, True).color is None
