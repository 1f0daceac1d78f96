"""MixGen and its Table 6 variants against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import MixGenConfig
from pretrain.mixgen import apply_mixgen, mixgen, mixgen_generator, mixgen_with_info, sample_beta

TEXTS = ["a red car", "two dogs play", "a man on a horse", "blue sky", "cat sleeps", "old tree by the lake"]


def _images(b: int = 6, c: int = 3, h: int = 2, w: int = 2) -> torch.Tensor:
    # distinct constant planes: row r has value r+1 everywhere (plus a per-pixel ramp so rows are not scalars)
    base = torch.arange(1, b + 1, dtype=torch.float32).view(b, 1, 1, 1)
    ramp = torch.linspace(-0.5, 0.5, c * h * w).view(1, c, h, w)
    return base + ramp


def _gen(seed: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def test_default_exact_values() -> None:
    img = _images(6)
    texts = list(TEXTS)
    out_img, out_txt = mixgen(img, texts, ratio=0.25, lam=0.5)
    # M = int(0.25 * 6) = 1: only row 0 mixed with row 1
    expected = img.clone()
    expected[0] = 0.5 * img[0] + 0.5 * img[1]
    assert torch.equal(out_img, expected)
    assert out_txt == ["a red car two dogs play"] + TEXTS[1:]
    # B=8, ratio 0.5, lam 0.7: rows 0..3 mixed with 4..7
    img8 = _images(8)
    t8 = [f"t{i}" for i in range(8)]
    o8, tt8 = mixgen(img8, t8, ratio=0.5, lam=0.7)
    for i in range(4):
        assert torch.equal(o8[i], 0.7 * img8[i] + (1 - 0.7) * img8[i + 4])
        assert tt8[i] == f"t{i} t{i + 4}"
    assert torch.equal(o8[4:], img8[4:]) and tt8[4:] == t8[4:]


def test_inputs_not_mutated_and_tuple_texts() -> None:
    img = _images(6)
    before = img.clone()
    texts = tuple(TEXTS)
    out_img, out_txt = mixgen(img, texts, variant="batch", generator=_gen())
    assert torch.equal(img, before)
    assert texts == tuple(TEXTS)
    assert isinstance(out_txt, list) and out_img is not img


def test_small_and_odd_batches() -> None:
    one = _images(1)
    o1, t1 = mixgen(one, ["solo"], ratio=0.25)
    assert torch.equal(o1, one) and t1 == ["solo"] and o1 is not one
    # B=2 and B=3: M = max(1, int(0.25 B)) = 1
    for b in (2, 3):
        img = _images(b)
        o, t = mixgen(img, TEXTS[:b])
        assert torch.equal(o[0], 0.5 * img[0] + 0.5 * img[1])
        assert t[0] == TEXTS[0] + " " + TEXTS[1]
        assert t[1:] == TEXTS[1:b] and torch.equal(o[1:], img[1:])
    # B=7, ratio 0.5: M=3, row 6 untouched
    img = _images(7)
    o, t = mixgen(img, [f"w{i}" for i in range(7)], ratio=0.5)
    assert [t[i] for i in range(3)] == ["w0 w3", "w1 w4", "w2 w5"] and t[6] == "w6"
    assert torch.equal(o[6], img[6])
    with pytest.raises(ValueError, match="B >= 2M"):
        mixgen(_images(4), TEXTS[:4], ratio=0.75)


def test_bad_inputs_named() -> None:
    with pytest.raises(ValueError, match="3 texts for 6 images"):
        mixgen(_images(6), TEXTS[:3])
    with pytest.raises(TypeError, match="text row 1"):
        mixgen(_images(2), ["ok", torch.tensor([101, 102])])
    with pytest.raises(ValueError, match="unknown variant"):
        mixgen(_images(2), TEXTS[:2], variant="f")
    with pytest.raises(ValueError, match="needs a generator"):
        mixgen(_images(2), TEXTS[:2], variant="b")


def test_variant_b_exact() -> None:
    img = _images(8)
    texts = [f"s{i} x" for i in range(8)]
    g = _gen(3)
    out, txt, info = mixgen_with_info(img, texts, ratio=0.5, lam=0.5, variant="b", generator=g)
    pick = torch.randint(0, 2, (4,), generator=_gen(3)).tolist()  # the only draw of variant b
    for i in range(4):
        assert torch.equal(out[i], 0.5 * img[i] + 0.5 * img[i + 4])
        assert txt[i] == (texts[i + 4] if pick[i] else texts[i])
    assert info.text_source == ["partner" if p else "row" for p in pick]
    assert txt[4:] == texts[4:]


def test_variant_c_exact() -> None:
    img = _images(8)
    texts = [f"s{i}" for i in range(8)]
    out, txt, info = mixgen_with_info(img, texts, ratio=0.5, variant="c", generator=_gen(5))
    pick = torch.randint(0, 2, (4,), generator=_gen(5)).tolist()
    assert 0 < sum(pick) < 4, "seed should exercise both choices"
    for i in range(4):
        assert torch.equal(out[i], img[i + 4] if pick[i] else img[i])
        assert txt[i] == f"s{i} s{i + 4}"
    assert info.lam.tolist() == [0.0 if p else 1.0 for p in pick]


def test_variant_batch_exact_from_snapshot() -> None:
    img = _images(6)
    texts = list(TEXTS)
    out, txt, info = mixgen_with_info(img, texts, lam=0.5, variant="batch", generator=_gen(11))
    perm = torch.randperm(6, generator=_gen(11))
    assert torch.equal(info.partners, perm) and torch.equal(info.rows, torch.arange(6))
    for i in range(6):
        # partners are always read from the unmixed input (no chained mixtures)
        assert torch.equal(out[i], 0.5 * img[i] + 0.5 * img[perm[i]])
        assert txt[i] == TEXTS[i] + " " + TEXTS[int(perm[i])]


def test_variant_a_recomputed() -> None:
    img = _images(8)
    texts = [f"s{i}" for i in range(8)]
    out, txt, info = mixgen_with_info(img, texts, ratio=0.5, variant="a", generator=_gen(7))
    lam = sample_beta(0.1, 0.1, 4, _gen(7))
    assert torch.equal(info.lam, lam)
    assert bool(((lam >= 0) & (lam <= 1)).all())
    for i in range(4):
        w = lam[i].to(torch.float32)
        assert torch.equal(out[i], w * img[i] + (1 - w) * img[i + 4])
        assert txt[i] == f"s{i} s{i + 4}"


def _subsequence(sub: list[str], full: list[str]) -> bool:
    it = iter(full)
    return all(any(w == x for x in it) for w in sub)


def test_variant_d_recomputed_and_invariants() -> None:
    b = 8
    img = _images(b)
    # distinct word vocabularies per row so every output word is traceable to its source
    texts = [" ".join(f"r{i}w{k}" for k in range(3 + i)) for i in range(b)]
    out, txt, info = mixgen_with_info(img, texts, ratio=0.5, variant="d", generator=_gen(2))
    g = _gen(2)
    lam = sample_beta(0.1, 0.1, 4, g)
    assert torch.equal(info.lam, lam)
    for i in range(4):
        wi, wj = texts[i].split(), texts[i + 4].split()
        li = float(lam[i])
        n_i = math.floor(li * len(wi) + 0.5)
        n_j = math.floor((1 - li) * len(wj) + 0.5)
        if n_i + n_j == 0:
            n_i, n_j = (1, 0) if li >= 0.5 else (0, 1)
        keep_i = sorted(torch.randperm(len(wi), generator=g)[:n_i].tolist())
        keep_j = sorted(torch.randperm(len(wj), generator=g)[:n_j].tolist())
        assert txt[i] == " ".join([wi[k] for k in keep_i] + [wj[k] for k in keep_j])
        words = txt[i].split()
        from_i = [w for w in words if w.startswith(f"r{i}w")]
        from_j = [w for w in words if w.startswith(f"r{i + 4}w")]
        assert words == from_i + from_j  # row's words first, then partner's, nothing else
        assert len(from_i) == n_i and len(from_j) == n_j and len(words) >= 1
        assert _subsequence(from_i, wi) and _subsequence(from_j, wj)
        w = lam[i].to(torch.float32)
        assert torch.equal(out[i], w * img[i] + (1 - w) * img[i + 4])


def test_variant_d_short_texts_rule() -> None:
    # lam near 0.5 with one-word texts: round(0.5*1)=1 each; with lam tiny: only the partner's word
    from pretrain.mixgen import _mix_words

    assert _mix_words("alpha", "beta", 0.5, _gen()) == "alpha beta"
    assert _mix_words("alpha", "beta", 1e-4, _gen()) == "beta"
    assert _mix_words("alpha", "beta", 1 - 1e-4, _gen()) == "alpha"
    # both round to zero (0.4*1 -> 0, 0.6*0 words): one word from the heavier non-empty text
    assert _mix_words("alpha", "", 0.4, _gen()) == "alpha"
    assert _mix_words("", "", 0.4, _gen()) == ""
    # lam = 0.45 on one-word texts: round(0.45)=0, round(0.55)=1 -> partner only
    assert _mix_words("alpha", "beta", 0.45, _gen()) == "beta"


def test_variant_e_recomputed_and_invariants() -> None:
    b = 6
    img = _images(b)
    texts = [" ".join(f"r{i}w{k}" for k in range(2 + i)) for i in range(b)]
    out, txt, info = mixgen_with_info(img, texts, ratio=0.5, variant="e", generator=_gen(4))
    g = _gen(4)
    lam = sample_beta(0.1, 0.1, 3, g)
    assert torch.equal(info.lam, lam)
    for i in range(3):
        words = texts[i].split() + texts[i + 3].split()
        keep = sorted(torch.randperm(len(words), generator=g)[: (len(words) + 1) // 2].tolist())
        assert txt[i] == " ".join(words[k] for k in keep)
        assert len(txt[i].split()) == math.ceil(len(words) / 2)
        assert _subsequence(txt[i].split(), words)
        w = lam[i].to(torch.float32)
        assert torch.equal(out[i], w * img[i] + (1 - w) * img[i + 3])
    assert txt[3:] == texts[3:]


@pytest.mark.parametrize("variant", ["default", "a", "b", "c", "d", "e", "batch"])
def test_two_views_mixed_identically(variant: str) -> None:
    v1, v2 = _images(8), -3.0 * _images(8) + 1.0
    (o1, o2), txt = mixgen((v1, v2), TEXTS + ["x y", "z"], ratio=0.5, variant=variant, generator=_gen(9))
    (s1,), txt_single = mixgen([v1], TEXTS + ["x y", "z"], ratio=0.5, variant=variant, generator=_gen(9))
    assert torch.equal(o1, s1) and txt == txt_single
    # same partners and weights: the second view's output is the same affine map of the first's
    assert torch.allclose(o2, -3.0 * o1 + 1.0, atol=1e-5)


def test_generator_determinism() -> None:
    a = torch.rand(5, generator=mixgen_generator(1, 10, 0))
    b = torch.rand(5, generator=mixgen_generator(1, 10, 0))
    assert torch.equal(a, b)
    assert torch.equal(a, torch.rand(5, generator=mixgen_generator(1, 10, 0, 0)))
    for other in ((2, 10, 0), (1, 11, 0), (1, 10, 1), (1, 10, 0, 1)):
        assert not torch.equal(a, torch.rand(5, generator=mixgen_generator(*other)))


def test_apply_mixgen_resume_identical_and_passthrough() -> None:
    img = _images(8)
    batch = {"image": img, "image2": img * 2, "text": tuple(f"t{i} u" for i in range(8)), "key": list("abcdefgh")}
    cfg = MixGenConfig(enabled=True, variant="d", ratio=0.25)
    first = apply_mixgen(batch, cfg, seed=3, step=17, rank=1)
    again = apply_mixgen(batch, cfg, seed=3, step=17, rank=1)  # e.g. after a resume at step 17
    assert torch.equal(first["image"], again["image"]) and first["text"] == again["text"]
    assert torch.equal(first["image2"], again["image2"])
    assert torch.equal(first["image2"][:2], first["image"][:2] * 2)  # views share partners and weights
    assert first["mixgen_rows"]["rows"].tolist() == [0, 1] and first["mixgen_rows"]["partners"].tolist() == [2, 3]
    assert first["key"] == batch["key"] and isinstance(first["text"], list)
    assert torch.equal(batch["image"], _images(8)) and batch["text"] == tuple(f"t{i} u" for i in range(8))
    other_rank = apply_mixgen(batch, MixGenConfig(variant="batch"), seed=3, step=17, rank=0)
    assert (
        other_rank["mixgen_rows"]["partners"].tolist()
        == torch.randperm(8, generator=mixgen_generator(3, 17, 0)).tolist()
    )
    off = apply_mixgen(batch, MixGenConfig(enabled=False), seed=3, step=17, rank=1)
    assert off is batch and "mixgen_rows" not in off
    with pytest.raises(KeyError, match="'text'"):
        apply_mixgen({"image": img}, cfg, seed=0, step=0, rank=0)


def test_beta_sampler_statistics() -> None:
    x = sample_beta(0.1, 0.1, 20000, _gen(123))
    assert x.dtype == torch.float64 and bool(((x >= 0) & (x <= 1)).all())
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)) = 0.2083 for a = 0.1; standard errors ~0.0035 / ~0.001
    assert abs(x.mean().item() - 0.5) < 0.015
    assert abs(x.var().item() - 1 / (4 * 1.2)) < 0.006
    # U-shaped: most mass near the ends
    assert ((x < 0.1) | (x > 0.9)).float().mean().item() > 0.7
    y = sample_beta(1.0, 1.0, 20000, _gen(5))  # Beta(1,1) = uniform: variance 1/12
    assert abs(y.mean().item() - 0.5) < 0.015 and abs(y.var().item() - 1 / 12) < 0.004
    z = sample_beta(0.5, 0.2, 20000, _gen(6))  # mean a/(a+b)
    assert abs(z.mean().item() - 0.5 / 0.7) < 0.015
    with pytest.raises(ValueError):
        sample_beta(2.0, 2.0, 3, _gen())
