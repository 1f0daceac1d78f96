"""Caption cleaning and generator-driven image transforms."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from data_prep.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    RandAugment,
    denormalize,
    eval_transform,
    pre_caption,
    random_resized_crop_box,
    train_transform,
)


def _noise_image(w: int = 40, h: int = 36, seed: int = 0) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pre_caption_by_hand():
    text = "A man's BIKE -- parked/near the (old) station!!  \n"
    assert pre_caption(text) == "a mans bike parked near the old station"
    assert pre_caption(text, max_words=4) == "a mans bike parked"
    assert pre_caption("<PERSON> rides a horse.") == "person rides a horse"
    assert pre_caption("5 $ & 3 ; ok") == "5 $ & 3 ok"  # only ALBEF's punctuation set is dropped
    assert pre_caption(" ?!... ") == ""
    assert pre_caption(" ".join(str(i) for i in range(40))).split() == [str(i) for i in range(30)]


def test_crop_box_respects_scale_ratio_and_bounds():
    for seed in range(200):
        left, top, w, h = random_resized_crop_box(64, 48, (0.3, 0.8), generator=_gen(seed))
        assert 0 <= left and 0 <= top and left + w <= 64 and top + h <= 48
        # rounding each side by at most 0.5 px
        assert 0.3 * 64 * 48 - (w + h) <= w * h <= 0.8 * 64 * 48 + (w + h)
        assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_crop_box_fallback_is_a_centered_clamped_crop():
    # a 100x4 strip admits no crop of 90-100 % of its area at ratio 3/4..4/3: centre crop, ratio clamped to 4/3
    assert random_resized_crop_box(100, 4, (0.9, 1.0), generator=_gen(0)) == (47, 0, 5, 4)
    assert random_resized_crop_box(4, 100, (0.9, 1.0), generator=_gen(0)) == (0, 47, 4, 5)


def test_train_transform_is_reproducible_from_the_generator_only():
    img = _noise_image()
    tf = train_transform(24, crop_scale=(0.5, 1.0), randaugment=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = tf(img, _gen(7))
    b = tf(img, _gen(7))
    c = tf(img, _gen(8))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never touched
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flip_and_full_crop_match_the_eval_resize():
    img = _noise_image(32, 32, seed=3)
    tf = train_transform(16, crop_scale=(1.0, 1.0))
    plain = eval_transform(16)(img)
    flips = set()
    for seed in range(24):
        out = tf(img, _gen(seed))
        if torch.equal(out, plain):
            flips.add(False)
        else:
            assert torch.equal(out, plain.flip(-1))
            flips.add(True)
    assert flips == {False, True}
    no_flip = train_transform(16, crop_scale=(1.0, 1.0), flip=False)
    assert all(torch.equal(no_flip(img, _gen(s)), plain) for s in range(8))


def test_normalize_and_denormalize_by_hand():
    rgb = (10, 128, 250)
    img = Image.new("RGB", (20, 12), rgb)
    out = eval_transform(8)(img)
    assert out.shape == (3, 8, 8)
    for ch in range(3):
        expected = (rgb[ch] / 255 - CLIP_MEAN[ch]) / CLIP_STD[ch]
        assert torch.allclose(out[ch], torch.full((8, 8), expected), atol=1e-6)
    back = denormalize(out.unsqueeze(0).repeat(2, 1, 1, 1))
    assert back.shape == (2, 3, 8, 8)
    for ch in range(3):
        assert torch.allclose(back[:, ch], torch.full((2, 8, 8), rgb[ch] / 255), atol=1e-6)
    assert torch.allclose(denormalize(out)[0], torch.full((8, 8), 10 / 255), atol=1e-6)


def test_randaugment_ops_change_the_image_and_keep_its_size():
    img = _noise_image(24, 24, seed=5)
    ra = RandAugment(num_ops=2, magnitude=7)
    for op in RandAugment.OPS:
        out = ra._apply(img, op, 1.0)
        assert out.size == img.size and out.mode == "RGB"
        if op not in ("identity",):
            assert out.tobytes() != img.tobytes(), op
    changed = sum(ra(img, _gen(s)).tobytes() != img.tobytes() for s in range(20))
    assert 5 <= changed < 20  # each op fires with probability 1/2 and identity is one of the ten


def test_bad_crop_scale_is_refused():
    with pytest.raises(ValueError, match="crop_scale"):
        train_transform(32, crop_scale=(0.0, 1.0))
    assert math.isclose(train_transform(32, crop_scale=(0.2, 1.0)).crop_scale[0], 0.2)
