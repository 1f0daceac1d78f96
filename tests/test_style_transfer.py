"""Training the style network (model ``style_transfer``): loss values by hand, the deterministic style sampler with
corrupt files, the MixGen guard, and a short run under the shared engine that writes the stage's checkpoint."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REPO, build_synthetic, read_metrics, subprocess_env
from PIL import Image

from launch.config import ConfigError
from pretrain.models.style_transfer import (
    StyleImages,
    content_loss,
    gram_matrix,
    style_loss,
    total_variation,
)


def make_style_dir(root: Path, n: int = 6) -> Path:
    """``n`` random images of varied sizes in two sub-folders, plus one corrupt file."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = root / ("paintings" if i % 2 else "textures")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (44 + 6 * i, 64, 3), dtype=np.uint8)).save(sub / f"s{i}.png")
    (root / "textures" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root


# ------------------------------------------------------------------------------------------- losses by hand


def test_gram_matrix_is_normalised_by_h_times_w_only():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])  # [1, 2, 2, 2]
    g = gram_matrix(f)
    # channel vectors a = (1,2,3,4), b = (0,1,1,0); divided by H*W = 4 (not by C)
    expected = torch.tensor([[30.0, 5.0], [5.0, 2.0]]) / 4
    assert torch.allclose(g[0], expected)
    assert style_loss(g, torch.zeros_like(g)).item() == pytest.approx((expected**2).mean().item())


def test_total_variation_matches_magenta_formula():
    x = torch.tensor([[[[0.0, 1.0, 3.0], [2.0, 2.0, 2.0]]]])  # B=1, C=1, H=2, W=3
    # dy = (2, 1, -1): l2 = (4+1+1)/2 = 3, / ((H-1) W C) = 3 -> 1
    # dx = (1, 2), (0, 0): l2 = (1+4)/2 = 2.5, / (H (W-1) C) = 4 -> 0.625
    assert total_variation(x).item() == pytest.approx(1.625)
    # the mean over the batch: two copies give the same value
    assert total_variation(torch.cat([x, x])).item() == pytest.approx(1.625)
    assert content_loss(torch.ones(2, 3), torch.zeros(2, 3)).item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from pretrain.config import resolve_model_options
    from pretrain.models import get

    styles = make_style_dir(tmp_path_factory.mktemp("styles"))
    opts = resolve_model_options(
        {"name": "style_transfer", "style_dir": str(styles), "vgg_weights": "random", "style_size": 48,
         "tv_weight": 10.0, "content_weight": 2.0, "style_weights": [1.0, 0.0, 0.0, 3.0]}
    )  # fmt: skip
    torch.manual_seed(0)
    return get("style_transfer")[1](opts)


def test_weighted_losses_combine_the_vgg_terms(tiny_model):
    g = torch.Generator().manual_seed(0)
    content, style, out = (torch.rand(2, 3, 32, 32, generator=g) for _ in range(3))
    losses = tiny_model.losses(content, style, out)
    fc, fs, fo = tiny_model.vgg(content), tiny_model.vgg(style), tiny_model.vgg(out)
    assert losses["content"].item() == pytest.approx(2.0 * ((fo["conv3_3"] - fc["conv3_3"]) ** 2).mean().item())
    expected_style = sum(
        w * ((gram_matrix(fo[n]) - gram_matrix(fs[n])) ** 2).mean().item()
        for w, n in ((1.0, "conv1_2"), (3.0, "conv4_3"))
    )
    assert losses["style"].item() == pytest.approx(expected_style, rel=1e-5)
    assert losses["tv"].item() == pytest.approx(10.0 * total_variation(out).item())
    # frozen loss network: no trainable VGG parameter, and train() keeps it in eval mode
    assert not any(p.requires_grad for p in tiny_model.vgg.parameters())
    tiny_model.train()
    assert not tiny_model.vgg.training and tiny_model.predictor.training


def test_validate_refuses_mixgen_and_configure_takes_loader_normalisation(tiny_model):
    cfg = SimpleNamespace(
        mixgen=SimpleNamespace(enabled=True),
        data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        run=SimpleNamespace(seed=3),
    )
    with pytest.raises(ConfigError, match="mixgen.enabled"):
        tiny_model.opts.validate(cfg)
    cfg.mixgen.enabled = False
    tiny_model.opts.validate(cfg)
    tiny_model.configure(cfg)
    image = torch.full((2, 3, 32, 32), 1.0)  # normalized 1.0 -> 0.5 + 0.25 = 0.75 in [0, 1]
    out = tiny_model({"image": image, "text": ["a", "b"], "step": 0})
    assert set(out["losses"]) == {"content", "style", "tv"}
    assert out["loss"].requires_grad and all(v.item() > 0 for v in out["losses"].values())
    assert out["loss"].item() == pytest.approx(sum(v.item() for v in out["losses"].values()), rel=1e-6)
    assert torch.equal(tiny_model.data_mean.flatten(), torch.full((3,), 0.5))


def test_bf16_weights_train_and_ranks_share_the_statistics(tiny_model):
    import copy

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)  # what DeepSpeed's bf16 mode hands the model
    cfg = SimpleNamespace(
        mixgen=SimpleNamespace(enabled=False),
        data=SimpleNamespace(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        run=SimpleNamespace(seed=0),
    )
    model.configure(cfg)
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    out = model({"image": image.to(torch.bfloat16), "step": 1})
    out["loss"].backward()
    reference = copy.deepcopy(tiny_model).float()  # same weights, same step: the same style images are drawn
    reference.configure(cfg)
    with torch.no_grad():
        expected = reference({"image": image, "step": 1})
    assert out["loss"].dtype == torch.float32
    # the total within bf16's precision of the fp32 value (the content term is a small difference of near-equal
    # features, so it is checked against the total's scale)
    assert out["loss"].item() == pytest.approx(expected["loss"].item(), rel=5e-2)
    for name, value in expected["losses"].items():
        assert abs(out["losses"][name].item() - value.item()) < 5e-2 * expected["loss"].item(), name
    assert model.transformer.out_conv.conv.weight.grad is not None
    # two ranks embed disjoint halves of the style files; together they cover the readable ones once
    full = tiny_model.style_embeddings()
    halves = torch.cat([tiny_model.style_embeddings(0, 2), tiny_model.style_embeddings(1, 2)])
    assert full.shape == halves.shape == (6, 100)  # 7 files, the broken one left out
    assert torch.allclose(full.sum(0), halves.sum(0), atol=1e-4)


def test_style_sampler_is_deterministic_and_skips_corrupt_files(tmp_path, caplog):
    styles = StyleImages(str(make_style_dir(tmp_path)), size=48, scale=1.5)
    assert len(styles.files) == 7  # six images + the broken one
    with caplog.at_level(logging.WARNING, logger="vlp.style_transfer"):
        batches = [styles.batch(0, step, 0, 8) for step in range(3)]
    assert all(b.shape == (8, 3, 48, 48) and 0 <= b.min() and b.max() <= 1 for b in batches)
    assert "broken.jpg" in caplog.text and len(styles.bad) == 1
    # a fresh sampler (a resumed run) draws the same images for the same (seed, step, rank)
    again = StyleImages(str(tmp_path), size=48, scale=1.5)
    assert torch.equal(again.batch(0, 2, 0, 8), batches[2])
    assert not torch.equal(batches[1], batches[2])
    assert not torch.equal(again.batch(0, 2, 1, 8), batches[2])  # another rank, other styles


def test_missing_style_dir_is_a_config_error(tmp_path):
    from pretrain.config import resolve_model_options

    with pytest.raises(ConfigError, match="model.style_dir"):
        resolve_model_options({"name": "style_transfer", "style_dir": str(tmp_path / "nope"), "vgg_weights": "random"})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        StyleImages(str(empty), size=48)


def test_init_checkpoint_starts_from_a_saved_network(tiny_model, tmp_path):
    from data_prep.style.network import save_style_checkpoint
    from pretrain.config import resolve_model_options
    from pretrain.models import get

    torch.manual_seed(1)
    donor = get("style_transfer")[1](tiny_model.opts)  # other random weights than tiny_model's
    path = tmp_path / "start.safetensors"
    save_style_checkpoint(path, donor.transformer, donor.predictor, torch.zeros(100), torch.eye(100),
                          meta={"predictor": tiny_model.opts.predictor})  # fmt: skip
    spec = {"name": "style_transfer", "style_dir": tiny_model.opts.style_dir, "vgg_weights": "random",
            "style_size": 48, "init_checkpoint": str(path)}  # fmt: skip
    torch.manual_seed(0)  # the same seed as tiny_model: without the start file its weights would be tiny_model's
    started = get("style_transfer")[1](resolve_model_options(spec))
    for name, mine in started.transformer.state_dict().items():
        assert torch.equal(mine, donor.transformer.state_dict()[name]), name
    for name, mine in started.predictor.state_dict().items():
        assert torch.equal(mine, donor.predictor.state_dict()[name]), name
    assert not torch.equal(started.predictor.fc.weight, tiny_model.predictor.fc.weight)

    with pytest.raises(ConfigError, match="model.init_checkpoint: style checkpoint not found"):
        resolve_model_options({**spec, "init_checkpoint": str(tmp_path / "missing.safetensors")})
    other = tmp_path / "inception.safetensors"
    save_style_checkpoint(other, donor.transformer, None, torch.zeros(100), torch.eye(100))  # no field: Inception
    with pytest.raises(ConfigError, match="holds a inception_v3 predictor"):
        resolve_model_options({**spec, "init_checkpoint": str(other)})


# ------------------------------------------------------------------------------------------- under the engine


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    out = build_synthetic(tmp_path_factory.mktemp("synthetic"), image_size=32, samples_per_shard=8, train=16)
    return out / "train", make_style_dir(tmp_path_factory.mktemp("styles"))


def _train(shards: Path, styles: Path, run_dir: Path, steps: int = 3, env: dict[str, str] | None = None):
    args = [
        sys.executable, "-m", "pretrain", "--config", "configs/pretrain/style_tiny.yaml", f"run.dir={run_dir}",
        f"data.shards={shards}/{{00000..00001}}.tar", f"model.style_dir={styles}", f"train.max_steps={steps}",
        "train.checkpoint_every=2", "model.image_log_every=1", "train.keep_checkpoints=2",
    ]  # fmt: skip
    return subprocess.run(
        args, cwd=REPO, env=subprocess_env(**(env or {})), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("style_run") / "full"
    proc = _train(*data, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow  # the full_run fixture trains the style network in a subprocess
def test_engine_run_writes_a_checkpoint_the_stage_loads(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_prep.style.network import StyleTransformer, load_style_checkpoint, predictor_for
    from data_prep.style.sampling import EmbeddingSampler

    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["style_stats_images"] == 6  # the broken file is not counted
    ck = load_style_checkpoint(summary["style_checkpoint"])
    assert ck["mean"].shape == (100,) and ck["cov"].shape == (100, 100)
    assert torch.allclose(ck["cov"], ck["cov"].T)
    StyleTransformer().load_state_dict(ck["transformer"])  # strict: every key present, none extra
    predictor_for(ck["meta"]).load_state_dict(ck["predictor"])  # the architecture the metadata names
    EmbeddingSampler(ck["mean"], ck["cov"])  # a valid (PSD) Gaussian for the stage
    # the stage's own loader accepts the file and stylizes with it
    from data_prep.style.stage import ModelSection, build_randomizer

    stage_cfg = SimpleNamespace(
        model=ModelSection(checkpoint=summary["style_checkpoint"], use_predictor=True),
        style=SimpleNamespace(seed=0, alpha=0.5),
        runtime=SimpleNamespace(precision="auto", chunk=0),
    )
    randomizer, info = build_randomizer(stage_cfg, torch.device("cpu"))
    assert info["kind"] == "checkpoint" and randomizer(torch.rand(1, 3, 48, 48)).shape == (1, 3, 48, 48)
    rows = read_metrics(full_run)
    assert [r["step"] for r in rows] == [1, 2, 3] and all({"content", "style", "tv"} <= set(r) for r in rows)
    acc = EventAccumulator(str(full_run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    assert {"images/content", "images/style", "images/stylized"} <= set(acc.Tags()["images"])


@pytest.mark.slow
def test_killed_run_resumes_exactly(data, full_run, tmp_path):
    from pretrain.engine import KILL_AFTER_STEP_ENV

    run_dir = tmp_path / "killed"
    first = _train(*data, run_dir, env={KILL_AFTER_STEP_ENV: "2"})
    assert first.returncode != 0  # SIGKILLed right after the step-2 checkpoint
    second = _train(*data, run_dir)
    assert second.returncode == 0, second.stderr[-3000:]

    losses = [r["loss"] for r in read_metrics(run_dir)]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(full_run)], rel=1e-6, abs=0)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step2")
    from data_prep.style.network import load_style_checkpoint

    a = load_style_checkpoint(full_run / "style_checkpoint.safetensors")
    b = load_style_checkpoint(run_dir / "style_checkpoint.safetensors")
    for k, v in a["transformer"].items():
        assert torch.allclose(v, b["transformer"][k], atol=1e-6), k
    assert torch.allclose(a["mean"], b["mean"], atol=1e-6)
