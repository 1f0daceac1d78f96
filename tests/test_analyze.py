"""Representation analysis (``python -m finetune analyze``): the measures against hand computations, and the command
on real CLIP and ALBEF runs (random weights saved the way the engine exports them) with PNG, JSON and TensorBoard."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import REPO, subprocess_env

from finetune.analyze import (
    alignment,
    embedding_stats,
    grad_cam,
    modality_gap,
    pca_2d,
    rank_changes,
    text_ranks,
    uniformity,
)


def test_measures_match_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    t2i = [0, 0, 1]
    # |(1,0)-(1,0)|^2 = 0, |(1,0)-(0.6,0.8)|^2 = 0.16 + 0.64, |(0,1)-(0,1)|^2 = 0
    assert alignment(img, txt, t2i) == pytest.approx(0.8 / 3)
    # two images at distance sqrt(2): log exp(-2 * 2) = -4
    assert uniformity(img) == pytest.approx(-4.0)
    sq = [0.8, 2.0, 0.4]  # pairwise squared distances of the three texts
    assert uniformity(txt) == pytest.approx(math.log(sum(math.exp(-2 * d) for d in sq) / 3))
    assert modality_gap(img, txt) == pytest.approx(math.dist((0.5, 0.5), (1.6 / 3, 1.8 / 3)))
    stats = embedding_stats(img * 3, txt, t2i)  # scale does not matter: embeddings are normalised first
    assert stats["alignment"] == pytest.approx(0.8 / 3) and stats["cos_matching"] == pytest.approx((1 + 0.6 + 1) / 3)
    # text 1 (0.6, 0.8) is closer to image 1 than to its own image 0: rank 2
    assert text_ranks(img, txt, t2i).tolist() == [1, 2, 1]
    assert rank_changes(torch.tensor([5, 1, 3, 2]), torch.tensor([1, 4, 3, 2]), 2) == ([0], [1])


def test_pca_and_grad_cam():
    x = torch.tensor([[3.0, 0.0, 0.1], [-3.0, 0.0, -0.1], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    xy = pca_2d(x)
    assert xy.shape == (4, 2) and abs(float(xy[0, 0])) == pytest.approx(3.0, abs=0.01)  # main axis first
    assert float(xy[:, 1].abs().max()) == pytest.approx(1.0, abs=0.01)
    tokens = torch.zeros(5, 2)
    tokens[0] = 100.0  # a class token is dropped, whatever its activation
    tokens[1 + 3] = torch.tensor([2.0, 0.0])
    tokens[1 + 1] = torch.tensor([1.0, 0.0])
    grads = torch.zeros(5, 2)
    grads[:, 0] = 1.0  # the score grows with channel 0
    cam = grad_cam(tokens, grads)
    assert cam.shape == (2, 2) and cam.tolist() == [[0.0, 0.5], [0.0, 1.0]]
    with pytest.raises(ValueError, match="square grid"):
        grad_cam(torch.zeros(7, 2), torch.zeros(7, 2))


def _fake_run(root, recipe: str, data, seed: int, overrides: dict):
    """A run folder as the engine leaves it: config.yaml and export.safetensors (random weights, ``seed``)."""
    from launch.config import load_config
    from pretrain import models
    from pretrain.config import PretrainConfig
    from pretrain.export import export_safetensors

    over = [f"data.shards={data}/train/{{00000..00000}}.tar", *[f"{k}={json.dumps(v)}" for k, v in overrides.items()]]
    cfg = load_config(PretrainConfig, recipe, over)
    torch.manual_seed(seed)
    model = models.get(cfg.model.name)[1](cfg.model)
    root.mkdir(parents=True)
    tree = yaml.safe_load((REPO / recipe).read_text())
    tree["model"] = {**tree["model"], **{k.split(".", 1)[1]: v for k, v in overrides.items()}}
    tree["data"]["shards"] = f"{data}/train/{{00000..00000}}.tar"  # a brace pattern, as recipes write it
    (root / "config.yaml").write_text(yaml.safe_dump(tree))
    export_safetensors(model.state_dict(), root / "export.safetensors", {"model": cfg.model.name})
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from data_prep.synthetic import SyntheticConfig, run
    from launch.config import load_config

    out = tmp_path_factory.mktemp("analyze_data")
    cfg = load_config(SyntheticConfig, str(REPO / "configs/data_prep/synthetic.yaml"),
                      [f"out.dir={out}", "out.image_size=32", "out.samples_per_shard=16", "splits.train=16",
                       "splits.val=0", "splits.test=12", "captions_per_image=2"])  # fmt: skip
    run(cfg)
    return out


def _analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "finetune", "analyze", *args], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)  # fmt: skip


def test_two_clip_runs_side_by_side(data, tmp_path):
    small = {"model.image_size": 32, "model.embed_dim": 32}
    a = _fake_run(tmp_path / "clip_a", "configs/pretrain/clip_tiny.yaml", data, 0, small)
    b = _fake_run(tmp_path / "clip_b", "configs/pretrain/clip_tiny.yaml", data, 1, small)
    res = _analyze(str(a), str(b), "data.image_size=32", "--queries", "2", "--top-k", "3")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = a / "analysis_vs_clip_b"
    result = json.loads((out / "analysis.json").read_text())
    assert set(result["runs"]) == {"clip_a", "clip_b"}
    for entry in result["runs"].values():
        assert entry["num_images"] == 12 and entry["num_texts"] == 24
        assert 0 <= entry["alignment"] <= 4 and entry["uniformity_joint"] <= 0 and entry["modality_gap"] >= 0
    rc = result["rank_changes"]
    assert rc["improved"] + rc["worsened"] + rc["same"] == 24
    for q in rc["queries"]:
        assert (q["rank_b"] < q["rank_a"]) == (q["change"] == "improved") and len(q["top_a"]) == 3
    for png in ("projection.png", "rank_changes.png"):
        assert (out / png).stat().st_size > 1000
    assert list((out / "tb").glob("events.out.tfevents.*"))
    # the numbers are the run's own: recompute alignment from a's weights independently
    from finetune.analyze import encode

    enc, _ = encode(a, "configs/finetune/retrieval_synthetic.yaml", ["data.image_size=32"], "test")
    img, txt = F.normalize(enc.img["emb"], dim=-1), F.normalize(enc.txt["emb"], dim=-1)
    own = sum(float((img[enc.split.txt2img[t]] - txt[t]).pow(2).sum()) for t in range(len(txt))) / len(txt)
    assert result["runs"]["clip_a"]["alignment"] == pytest.approx(own, rel=1e-4)


@pytest.mark.slow
def test_fusion_run_gets_grad_cam(data, tmp_path):
    run = _fake_run(tmp_path / "albef", "configs/pretrain/albef_tiny.yaml", data, 0, {})
    res = _analyze(str(run), "data.image_size=32", "--pairs", "2")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    result = json.loads((run / "analysis" / "analysis.json").read_text())
    entry = result["runs"]["albef"]
    assert entry["kind"] == "fusion" and len(entry["gradcam"]) == 2 and "alignment" in entry
    assert (run / "analysis" / "gradcam_albef.png").stat().st_size > 1000


def test_bad_run_is_a_clear_error(tmp_path):
    res = _analyze(str(tmp_path / "nope"))
    assert res.returncode == 2 and "is not a run folder" in res.stderr
