"""Style network, sampling, weight import (strad) and the online transform."""

from __future__ import annotations

import fractions
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data_prep.style.network import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREDICTOR_MIN_SIZE,
    CondInstanceNorm,
    StylePredictor,
    StyleTransformer,
    inception_preprocess,
    instance_norm_act,
    load_style_checkpoint,
    save_style_checkpoint,
)
from data_prep.style.online import OnlineStyleAugment
from data_prep.style.sampling import (
    EmbeddingSampler,
    StyleRandomizer,
    mix_embedding,
    parse_ratio,
    ratio_copies,
    sample_seed,
)
from data_prep.style.strad import (
    CheckpointKeyError,
    load_embedding_stats,
    load_legacy,
    load_predictor_state,
    load_transformer_state,
)

REAL_EMBEDDINGS = Path(__file__).resolve().parents[1] / "assets" / "strad" / "checkpoint_embeddings.pth"


@pytest.fixture(scope="module")
def transformer() -> StyleTransformer:
    torch.manual_seed(0)
    return StyleTransformer().eval()


@pytest.fixture(scope="module")
def predictor() -> StylePredictor:
    torch.manual_seed(0)
    return StylePredictor().eval()


def small_stats(d: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.1
    return torch.randn(d, generator=g, dtype=torch.float64), a @ a.T + 1e-3 * torch.eye(d, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ an independent reference
REF_LAYERS = [(3, 32, 9, 1), (32, 64, 3, 2), (64, 128, 3, 2)]


def reference_state_dict(seed: int = 1) -> dict[str, torch.Tensor]:
    """Random weights under the public code's key names (styleaug/ghiasi.py, as documented in reference/style.md)."""
    g = torch.Generator().manual_seed(seed)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1

    sd: dict[str, torch.Tensor] = {}
    for i, (ci, co, k, _) in enumerate(REF_LAYERS):
        sd[f"layers.{i}.conv.weight"], sd[f"layers.{i}.conv.bias"] = t(co, ci, k, k), t(co)
    for i in range(3, 8):
        for n in (1, 2):
            sd[f"layers.{i}.conv{n}.weight"], sd[f"layers.{i}.conv{n}.bias"] = t(128, 128, 3, 3), t(128)
            for gb in ("gamma", "beta"):
                sd[f"layers.{i}.fc_{gb}{n}.weight"], sd[f"layers.{i}.fc_{gb}{n}.bias"] = t(128, 100), t(128)
    for i, (ci, co, k) in zip((8, 9, 10), [(128, 64, 3), (64, 32, 3), (32, 3, 9)]):
        sd[f"layers.{i}.conv.weight"], sd[f"layers.{i}.conv.bias"] = t(co, ci, k, k), t(co)
        for gb in ("gamma", "beta"):
            sd[f"layers.{i}.fc_{gb}.weight"], sd[f"layers.{i}.fc_{gb}.bias"] = t(co, 100), t(co)
    return sd


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The published op sequence, written plainly: IN, then gamma*x + beta, nearest upsample, sigmoid."""

    def conv(x: torch.Tensor, p: str, s: int = 1) -> torch.Tensor:
        k = sd[p + ".weight"].shape[-1]
        return F.conv2d(F.pad(x, (k // 2,) * 4, mode="reflect"), sd[p + ".weight"], sd[p + ".bias"], stride=s)

    def cin(x: torch.Tensor, p: str, suffix: str = "") -> torch.Tensor:
        gamma = F.linear(z, sd[f"{p}.fc_gamma{suffix}.weight"], sd[f"{p}.fc_gamma{suffix}.bias"])
        beta = F.linear(z, sd[f"{p}.fc_beta{suffix}.weight"], sd[f"{p}.fc_beta{suffix}.bias"])
        return F.instance_norm(x) * gamma[:, :, None, None] + beta[:, :, None, None]

    for i, (_, _, _, s) in enumerate(REF_LAYERS):
        x = F.relu(F.instance_norm(conv(x, f"layers.{i}.conv", s)))
    for i in range(3, 8):
        y = F.relu(cin(conv(x, f"layers.{i}.conv1"), f"layers.{i}", "1"))
        x = x + cin(conv(y, f"layers.{i}.conv2"), f"layers.{i}", "2")
    for i in (8, 9):
        x = F.relu(cin(conv(F.interpolate(x, scale_factor=2, mode="nearest"), f"layers.{i}.conv"), f"layers.{i}"))
    return torch.sigmoid(cin(conv(x, "layers.10.conv"), "layers.10"))


# ------------------------------------------------------------------------------------------ transformer
@pytest.mark.parametrize("size", [(32, 32), (37, 50), (45, 29), (8, 12)])
def test_transformer_shapes_any_size(transformer: StyleTransformer, size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = transformer(x, torch.randn(2, 100))
    assert y.shape == x.shape
    assert y.min() >= 0 and y.max() <= 1


def test_transformer_rejects_tiny_and_bad_z(transformer: StyleTransformer) -> None:
    with pytest.raises(ValueError, match="at least 8px"):
        transformer(torch.rand(1, 3, 6, 20), torch.randn(1, 100))
    with pytest.raises(ValueError, match="z must be"):
        transformer(torch.rand(2, 3, 16, 16), torch.randn(1, 100))


def test_transformer_matches_reference_op_sequence_after_import() -> None:
    """Import reference-named weights, then our fused/sub-pixel forward equals the plain published op sequence."""
    sd = reference_state_dict()
    net = StyleTransformer().eval()
    load_transformer_state(sd, net)
    assert torch.equal(net.res[0].norm1.gamma.weight, sd["layers.3.fc_gamma1.weight"])
    assert torch.equal(net.res[4].conv2.conv.bias, sd["layers.7.conv2.bias"])
    assert torch.equal(net.up[1].norm.beta.weight, sd["layers.9.fc_beta.weight"])
    assert torch.equal(net.out_conv.conv.weight, sd["layers.10.conv.weight"])
    assert torch.equal(net.down[2].conv.weight, sd["layers.2.conv.weight"])
    x, z = torch.rand(2, 3, 36, 44), torch.randn(2, 100)
    with torch.no_grad():
        ours = net(x, z)
        ref = reference_forward(sd, x, z)
        net.to(memory_format=torch.channels_last)
        ours_cl = net(x.contiguous(memory_format=torch.channels_last), z)
    assert (ours - ref).abs().max().item() < 2e-5
    assert (ours_cl - ref).abs().max().item() < 2e-5


def test_conditional_norm_uses_embedding(transformer: StyleTransformer) -> None:
    x = torch.rand(1, 3, 32, 32).expand(2, -1, -1, -1)
    z = torch.randn(1, 100)
    with torch.no_grad():
        same = transformer(x, z.expand(2, -1))
        diff = transformer(x, torch.cat([z, z + torch.randn(1, 100)]))
        again = transformer(x, z.expand(2, -1))
        alone = transformer(x[:1], z)
    assert torch.equal(same[0], same[1])
    assert torch.equal(again, same)  # deterministic for the same inputs
    assert torch.allclose(alone[0], same[0], atol=1e-5)  # batch neighbours change only rounding
    assert (diff[0] - diff[1]).abs().mean() > 1e-3


def test_transformer_trains() -> None:
    """A trainer can back-propagate through the fused norm, sub-pixel upsample and row-split output conv."""
    net = StyleTransformer()
    net(torch.rand(2, 3, 20, 24), torch.randn(2, 100)).square().mean().backward()
    for name in ("down.0.conv.weight", "res.2.norm1.gamma.weight", "up.1.conv.conv.weight", "out_conv.conv.weight"):
        grad = net.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_parameter_layout_matches_published_counts(transformer: StyleTransformer, predictor: StylePredictor) -> None:
    norms = [m for m in transformer.modules() if isinstance(m, CondInstanceNorm)]
    assert len(norms) == 13
    assert sum(2 * m.gamma.out_features for m in norms) == 2758
    assert sum(p.numel() for p in transformer.parameters()) == 1_954_593
    assert all(len(list(m.parameters())) == 2 for m in transformer.down)  # conv only: not style-conditioned
    assert sum(p.numel() for p in predictor.parameters()) == 9_042_756
    assert sum(b.numel() for n, b in predictor.named_buffers() if "running" in n) == 18_816


def test_instance_norm_matches_torch_even_with_offset() -> None:
    x = torch.randn(2, 5, 17, 13) * 0.5 + 20.0
    scale, shift = torch.randn(2, 5), torch.randn(2, 5)
    ref = F.instance_norm(x) * scale[:, :, None, None] + shift[:, :, None, None]
    assert (instance_norm_act(x, scale, shift) - ref).abs().max().item() < 2e-3
    assert torch.allclose(instance_norm_act(x, relu=True), F.relu(F.instance_norm(x)), atol=2e-3)


# ------------------------------------------------------------------------------------------ predictor
def test_normalization_constants() -> None:
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)  # blue std 0.225, not the public code's 0.255
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(inception_preprocess(x), 2 * x - 1, atol=1e-6)
    buggy_blue = ((x[:, 2] - 0.406) / 0.255) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
    assert not torch.allclose(inception_preprocess(x)[:, 2], buggy_blue, atol=1e-3)


def test_predictor_shapes_and_min_size(predictor: StylePredictor) -> None:
    assert PREDICTOR_MIN_SIZE == 43
    with torch.no_grad():
        assert predictor(torch.rand(2, 3, 43, 43)).shape == (2, 100)
        assert predictor(torch.rand(1, 3, 64, 80)).shape == (1, 100)
        with pytest.raises(ValueError, match="at least 43x43"):
            predictor(torch.rand(1, 3, 42, 64))


def test_predictor_import_strict(predictor: StylePredictor) -> None:
    # torchvision/reference names (timm uses the same trunk names); legacy files lack num_batches_tracked.
    ref = {k.removeprefix("backbone."): v.clone() for k, v in predictor.state_dict().items()}
    ref = {k: v + 0.5 if v.is_floating_point() else v for k, v in ref.items() if "num_batches_tracked" not in k}
    assert "Mixed_6e.branch_pool.bn.running_var" in ref and "fc.weight" in ref
    target = StylePredictor()
    load_predictor_state(ref, target)
    assert torch.equal(target.backbone.Mixed_6e.branch_pool.bn.running_var, ref["Mixed_6e.branch_pool.bn.running_var"])
    assert torch.equal(target.fc.bias, ref["fc.bias"])
    extra = dict(ref, **{"Mixed_7a.branch3x3_1.conv.weight": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match="unexpected 1 keys.*Mixed_7a"):
        load_predictor_state(extra, target)


# ------------------------------------------------------------------------------------------ weight import
def test_transformer_import_missing_unexpected_and_shape_errors() -> None:
    net = StyleTransformer()
    sd = reference_state_dict()
    missing = {k: v for k, v in sd.items() if k != "layers.5.fc_beta2.bias"}
    with pytest.raises(CheckpointKeyError, match=r"missing 1 keys: \['res.2.norm2.beta.bias'\]"):
        load_transformer_state(missing, net)
    with pytest.raises(CheckpointKeyError, match="unexpected 1 keys.*layers.11.conv.weight"):
        load_transformer_state(dict(sd, **{"layers.11.conv.weight": torch.zeros(3)}), net)
    bad = dict(sd, **{"layers.0.conv.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(CheckpointKeyError, match="shape"):
        load_transformer_state(bad, net)
    load_transformer_state({f"module.{k}": v for k, v in sd.items()}, net)  # DataParallel prefix is fine


def test_unsafe_pickle_needs_explicit_flag(tmp_path: Path) -> None:
    safe = tmp_path / "safe.pth"
    torch.save({"state_dict_ghiasi": {"w": torch.ones(2)}}, safe, _use_new_zipfile_serialization=False)
    assert torch.equal(load_legacy(safe)["state_dict_ghiasi"]["w"], torch.ones(2))  # legacy format, weights only
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"w": torch.ones(2), "extra": fractions.Fraction(1, 3)}, unsafe, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="allow_unsafe_pickle=True"):
        load_legacy(unsafe)
    assert load_legacy(unsafe, allow_unsafe_pickle=True)["extra"] == fractions.Fraction(1, 3)


def test_real_embedding_statistics() -> None:
    st = load_embedding_stats(REAL_EMBEDDINGS)
    assert st.mean.shape == (100,) and st.cov.shape == (100, 100) and st.base.shape == (100,)
    assert torch.equal(st.cov, st.cov.T)
    evals = torch.linalg.eigvalsh(st.cov)
    assert evals.min() > 0  # positive definite: smallest eigenvalue ~2.6e-5
    assert abs(evals.min().item() - 2.6e-5) < 0.5e-5
    assert abs(torch.trace(st.cov).item() - 2.195) < 0.01
    assert abs(st.mean.norm().item() - 1.78) < 0.01 and abs(st.base.norm().item() - 1.63) < 0.01
    assert int(st.mean.abs().argmax()) == 39


def test_style_checkpoint_roundtrip(tmp_path: Path, transformer: StyleTransformer) -> None:
    mean, cov = small_stats()
    for name in ("style.safetensors", "style.pt"):
        save_style_checkpoint(tmp_path / name, transformer, None, mean, cov, base_embedding=mean * 2)
        ck = load_style_checkpoint(tmp_path / name)
        net = StyleTransformer()
        net.load_state_dict(ck["transformer"])  # strict
        assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), transformer.state_dict().values()))
        assert ck["predictor"] is None and torch.equal(ck["cov"], cov) and torch.equal(ck["base"], mean * 2)
    torch.save({"tensors": {}, "meta": {"format": "other"}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="format"):
        load_style_checkpoint(tmp_path / "bad.pt")


# ------------------------------------------------------------------------------------------ sampling
def test_sampling_deterministic_and_per_key() -> None:
    mean, cov = small_stats()
    s = EmbeddingSampler(mean, cov)
    a = s.sample(4, torch.Generator().manual_seed(3))
    b = s.sample(4, torch.Generator().manual_seed(3))
    c = s.sample(4, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    seeds = [sample_seed(0, "000010002", j) for j in range(3)]
    assert len(set(seeds)) == 3 and seeds[0] == sample_seed(0, "000010002", 0) != sample_seed(1, "000010002", 0)
    both = s.sample_seeded(seeds)
    assert torch.equal(both[2], s.sample_seeded(seeds[2:])[0])  # a row depends on its own seed only


@pytest.mark.parametrize("singular", [False, True])
def test_sampling_distribution(singular: bool) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3 if singular else 5, generator=g, dtype=torch.float64)
    cov = a @ a.T  # rank 3 when singular: PSD but not PD (Cholesky would fail)
    mean = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    z = EmbeddingSampler(mean, cov).sample(40_000, torch.Generator().manual_seed(1)).double()
    assert (z.mean(0) - mean).abs().max() < 4 * math.sqrt(cov.diag().max() / 40_000)
    emp = torch.cov(z.T)
    assert (emp - cov).abs().max() < 0.05 * cov.abs().max()


def test_sampler_rejects_bad_covariance() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        EmbeddingSampler(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        EmbeddingSampler(torch.zeros(2), torch.tensor([[1.0, 0.0], [0.0, -1.0]]))


def test_alpha_mixing_exact_with_and_without_predictor() -> None:
    z, base = torch.randn(3, 100), torch.randn(3, 100)
    assert torch.equal(mix_embedding(z, base, 0.3), 0.3 * z + 0.7 * base)
    seen: list[torch.Tensor] = []

    class Spy(StyleTransformer):
        def forward(self, content: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            seen.append(z.clone())
            return content

    class FixedPredictor(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(1, 2, 3))[:, None].expand(-1, 100) * 10

    mean, cov = small_stats()
    base_emb = torch.randn(100, dtype=torch.float64)
    x = torch.rand(2, 3, 48, 48)
    zr = torch.randn(2, 100)
    plain = StyleRandomizer(Spy(), EmbeddingSampler(mean, cov), None, base_embedding=base_emb, alpha=0.25)
    plain(x, z_rand=zr)
    assert torch.allclose(seen[-1], 0.25 * zr + 0.75 * base_emb.float(), atol=1e-6)
    withp = StyleRandomizer(Spy(), EmbeddingSampler(mean, cov), FixedPredictor(), alpha=0.5)  # type: ignore[arg-type]
    withp(x, z_rand=zr)
    assert torch.allclose(seen[-1], 0.5 * zr + 0.5 * x.mean(dim=(1, 2, 3))[:, None] * 10, atol=1e-6)
    assert torch.allclose(withp.predict_base(x), x.mean(dim=(1, 2, 3))[:, None].expand(-1, 100) * 10, atol=1e-6)
    withp(x, z_rand=zr, base=torch.ones(2, 100))  # a precomputed P(c) skips the predictor
    assert torch.allclose(seen[-1], 0.5 * zr + 0.5, atol=1e-6)
    # below the predictor's minimum (43 px for Inception) the predictor sees an upsampled copy: the mean-colour
    # predictor gives the small image's own mean, and the output keeps the small size
    small = torch.rand(2, 3, 32, 24)
    seen.clear()
    out = withp(small, z_rand=zr)
    assert out.shape == small.shape
    assert torch.allclose(seen[-1], 0.5 * zr + 0.5 * small.mean(dim=(1, 2, 3))[:, None] * 10, atol=2e-2)


def test_ratio_parsing_and_copies() -> None:
    assert parse_ratio("16:1") == (16, 1) and parse_ratio("1:32") == (1, 32)
    with pytest.raises(ValueError, match="unaugmented:augmented"):
        parse_ratio("2")
    assert sum(ratio_copies(i, 16, 1) for i in range(32)) == 2
    assert [ratio_copies(i, 1, 3) for i in range(4)] == [3, 3, 3, 3]
    assert sum(ratio_copies(i, 3, 2) for i in range(9)) == 6


# ------------------------------------------------------------------------------------------ online transform
def test_online_transform(transformer: StyleTransformer) -> None:
    mean, cov = small_stats()
    rnd = StyleRandomizer(transformer, EmbeddingSampler(mean, cov))
    norm_mean, norm_std = (0.48, 0.45, 0.40), (0.27, 0.26, 0.27)
    x01 = torch.rand(6, 3, 24, 24)
    x = (x01 - torch.tensor(norm_mean).view(1, 3, 1, 1)) / torch.tensor(norm_std).view(1, 3, 1, 1)
    aug = OnlineStyleAugment(rnd, norm_mean, norm_std, ratio="1:1")
    assert aug.p == 0.5
    out, mask = aug.apply(x, torch.Generator().manual_seed(5))
    out2, mask2 = aug.apply(x, torch.Generator().manual_seed(5))
    assert torch.equal(out, out2) and torch.equal(mask, mask2)
    assert 0 < int(mask.sum()) < 6
    assert torch.equal(out[~mask], x[~mask])  # untouched images are bit-identical
    assert (out[mask] - x[mask]).abs().mean() > 0.05
    # p=1: every image equals the randomizer's output on the de-normalized input, re-normalized.
    g = torch.Generator().manual_seed(9)
    allp = OnlineStyleAugment(rnd, norm_mean, norm_std, p=1.0)(x, g)
    g = torch.Generator().manual_seed(9)
    torch.rand(6, generator=g)
    expect = rnd(x01, z_rand=rnd.sampler.sample(6, g))
    expect = (expect - torch.tensor(norm_mean).view(1, 3, 1, 1)) / torch.tensor(norm_std).view(1, 3, 1, 1)
    assert (allp - expect).abs().max() < 1e-4
    assert torch.equal(OnlineStyleAugment(rnd, norm_mean, norm_std, p=0.0)(x), x)


def test_randomizer_output_feeds_autograd(transformer: StyleTransformer) -> None:
    mean, cov = small_stats()
    rnd = StyleRandomizer(transformer, EmbeddingSampler(mean, cov))
    y = rnd(torch.rand(1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    F.conv2d(y, w).sum().backward()  # no "inference tensor" error: the randomizer uses no_grad, not inference_mode
    assert w.grad is not None and not y.requires_grad
