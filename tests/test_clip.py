"""CLIP model and contrastive loss: hand-computed values and distributed == single-process gradients."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.multiprocessing as mp

from launch.dist import free_port
from pretrain.objectives import ClipLoss, contrastive_targets, gather_features

TINY = {
    "name": "clip",
    "vision": {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1, "patch_size": 8}},
    "text": {"name": "minilm", "config": {"num_hidden_layers": 1}, "max_length": 16},
    "embed_dim": 16,
    "image_size": 32,
}
CAPTIONS = [
    "a red square on grass",
    "two dogs running",
    "a blue circle",
    "a cat on a sofa near a window",
    "green triangle",
    "the sea at night",
    "a yellow car parked",
    "three apples and a pear",
]
PROJ = ("image_proj.weight", "text_proj.weight", "logit_scale")


def _tiny_clip():
    from pretrain.config import resolve_model_options
    from pretrain.models import get

    opts = resolve_model_options(TINY)
    torch.manual_seed(0)
    model = get("clip")[1](opts)
    model.eval()  # no dropout: the single- and multi-process forwards must see the same function
    return model


def _global_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(len(CAPTIONS), 3, 32, 32, generator=g), "text": list(CAPTIONS)}


def test_loss_matches_hand_computation_2x2():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits_per_image = 10 * image @ text.T = [[10, 6], [0, 8]]; logits_per_text is its transpose.
    expected = (
        math.log1p(math.exp(-4)) + math.log1p(math.exp(-8)) + math.log1p(math.exp(-10)) + math.log1p(math.exp(-2))
    ) / 4
    loss = ClipLoss()(image, text, 10.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert ClipLoss(local_loss=False)(image, text, 10.0).item() == pytest.approx(expected, rel=1e-6)


def test_gather_and_targets_without_process_group():
    x = torch.randn(3, 4)
    assert gather_features(x) is x
    assert contrastive_targets(3).tolist() == [0, 1, 2]
    assert contrastive_targets(3, rank=2).tolist() == [6, 7, 8]


def test_clip_forward_outputs_and_embeddings():
    model = _tiny_clip()
    batch = _global_batch()
    out = model(batch)
    assert set(out) >= {"loss", "losses", "logit_scale"}
    assert out["losses"]["itc"].item() == pytest.approx(out["loss"].item())
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5)
    # random features: the loss is near ln(B), the chance level, and certainly finite
    assert 0.5 * math.log(8) < out["loss"].item() < 3 * math.log(8)
    img = model.encode_image(batch["image"][:2])
    txt = model.encode_text(batch["text"][:3])
    assert img.shape == (2, 16) and txt.shape == (3, 16)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(TypeError):
        model.encode_text("one string")
    # padding: to the longest caption by default; to text.max_length (16 here) when fixed, as open_clip's context
    assert model.tokenize(["a b", "a b c d"])["input_ids"].shape[1] < 16
    model.opts.text_padding = "max_length"
    assert model.tokenize(["a b", "a b c d"])["input_ids"].shape[1] == 16


def test_logit_scale_clamped():
    model = _tiny_clip()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)
    model.after_optimizer_step()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    assert "logit_scale" in model.no_weight_decay()


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _tiny_clip()
        batch = _global_batch()
        per = len(CAPTIONS) // world
        local = {
            "image": batch["image"][rank * per : (rank + 1) * per],
            "text": batch["text"][rank * per : (rank + 1) * per],
        }
        loss = model(local)["loss"]
        loss.backward()
        params = dict(model.named_parameters())
        grads = {}
        for name in PROJ:
            g = params[name].grad.detach().clone()
            dist.all_reduce(g)  # what DDP / DeepSpeed do: the mean of the ranks' gradients
            grads[name] = g / world
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0:
            torch.save({"loss": mean_loss / world, "grads": grads}, out_path)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_loss_and_grads_equal_single_process(tmp_path):
    out_path = str(tmp_path / "dist.pt")
    mp.spawn(_worker, args=(2, free_port(), out_path), nprocs=2, join=True)
    dist_result = torch.load(out_path, weights_only=True)

    model = _tiny_clip()
    loss = model(_global_batch())["loss"]  # one process, the whole global batch: the mean over all 8 pairs
    loss.backward()
    params = dict(model.named_parameters())
    assert dist_result["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for name in PROJ:
        ref = params[name].grad
        assert ref.abs().sum() > 0
        torch.testing.assert_close(dist_result["grads"][name], ref, rtol=1e-4, atol=1e-6)
