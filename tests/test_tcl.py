"""TCL: IMC and LMI against hand computations, the second view feeding the momentum encoder, the loss weighting,
and a 2-process torchrun run that resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.encoders import TextOptions, VisionOptions
from pretrain.models.tcl import Tcl, TclOptions
from pretrain.objectives import global_local_loss, intra_modal_loss, pool_patches

TEXTS = ["a red circle", "two blue squares on the left", "a green triangle", "a yellow star above a cat"]


@pytest.fixture(scope="module")
def model() -> Tcl:
    torch.manual_seed(0)
    opts = TclOptions(
        vision=VisionOptions(name="vit_tiny_patch16_224", kwargs={"depth": 1, "patch_size": 8}),
        text=TextOptions(config={"num_hidden_layers": 2}),
        image_size=32,
        embed_dim=16,
        queue_size=8,
        lmi_grid=2,
    )
    return Tcl(opts)


def batch(n: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "image2": torch.randn(n, 3, 32, 32, generator=g),
        "text": list(TEXTS[:n]),
    }


def log_softmax_first(values: list[float]) -> float:
    top = max(values)
    return values[0] - top - math.log(sum(math.exp(v - top) for v in values))


def test_intra_modal_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(2, 3, generator=g), dim=1)
    feat_all = F.normalize(torch.randn(5, 3, generator=g), dim=1)  # 2 momentum rows + 3 queue rows
    temp = 0.2
    expected = 0.0
    for b in range(2):
        row = [float(feat[b] @ c) / temp for c in feat_all]
        expected -= log_softmax_first([row[b]] + row[:b] + row[b + 1 :])
    assert intra_modal_loss(feat, feat_all, temp).item() == pytest.approx(expected / 2, rel=1e-5)


def test_global_local_loss_matches_tcl_definition_with_text_padding():
    g = torch.Generator().manual_seed(1)
    bsz, n, d, temp = 3, 4, 5, 0.1
    local = F.normalize(torch.randn(bsz, n, d, generator=g), dim=-1)
    glob = F.normalize(torch.randn(bsz, d, generator=g), dim=-1)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    expected = 0.0
    for b in range(bsz):
        negatives = [float(glob[b] @ local[o, j]) / temp for o in range(bsz) if o != b for j in range(n) if mask[o, j]]
        valid = [j for j in range(n) if mask[b, j]]
        per = [-log_softmax_first([float(local[b, j] @ glob[b]) / temp] + negatives) for j in valid]
        expected += sum(per) / len(per)
    expected /= bsz
    assert global_local_loss(local, glob, temp, mask).item() == pytest.approx(expected, rel=1e-5)
    # without a mask every local counts
    full = global_local_loss(local, glob, temp)
    manual = 0.0
    for b in range(bsz):
        negatives = [float(glob[b] @ local[o, j]) / temp for o in range(bsz) if o != b for j in range(n)]
        manual += sum(-log_softmax_first([float(local[b, j] @ glob[b]) / temp] + negatives) for j in range(n)) / n
    assert full.item() == pytest.approx(manual / bsz, rel=1e-5)
    # a batch of one has no negative: zero loss, not nan
    assert global_local_loss(local[:1], glob[:1], temp).item() == pytest.approx(0.0, abs=1e-6)


def test_pool_patches_averages_grid_cells():
    tokens = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)  # 4x4 grid, row-major
    pooled = pool_patches(tokens, (4, 4), 2)
    assert pooled.squeeze().tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="grid"):
        pool_patches(tokens, (3, 3), 2)


def test_forward_losses_weighting_second_view_and_backward(model):
    model.train()
    b = batch(4)
    ptr = int(model.queues.queue_ptr)
    out = model(b)
    model.commit_step()
    losses = out["losses"]
    assert list(losses) == ["itc", "imc", "lmi", "itm", "mlm"]
    expected = (losses["itc"] + losses["imc"] + losses["lmi"]) / 3 + losses["itm"] + losses["mlm"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    # the momentum image encoder saw the second view: its features were enqueued
    with torch.no_grad():
        emb = model.visual_encoder_m.forward_features(b["image2"])
        feat_m = F.normalize(model.vision_proj_m(emb[:, 0]), dim=-1)
    assert torch.allclose(model.queues.image_queue[ptr : ptr + 4], feat_m, atol=1e-6)


def test_missing_second_view_is_a_clear_error(model):
    with pytest.raises(KeyError, match="data.views: 2"):
        model({"image": torch.zeros(4, 3, 32, 32), "text": list(TEXTS)})


def test_state_dict_round_trip(model):
    model.train()
    model(batch(4, seed=2))
    state = model.state_dict()
    torch.manual_seed(7)
    other = Tcl(model.opts)
    other.load_state_dict(state)
    assert all(torch.equal(v, state[k]) for k, v in other.state_dict().items())
