"""Fine-tuning from another model's weights is an error before training that names the keys and the checkpoint's
own model (read from the run's config.yaml or the export's metadata); the same model still loads every weight."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pretrain.export import MODEL_STATES, InitMismatchError, export_safetensors, init_source
from tests.helpers import REPO, subprocess_env

VISION = {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 1, "patch_size": 8}}
CLIP = {"name": "clip", "vision": VISION, "text": {"config": {"num_hidden_layers": 1}}, "embed_dim": 16,
        "image_size": 32}  # fmt: skip
ALBEF = {"name": "albef", "vision": VISION, "text": {"config": {"num_hidden_layers": 2}}, "embed_dim": 16,
         "image_size": 32, "queue_size": 8}  # fmt: skip


def _build(section: dict):
    from pretrain.config import resolve_model_options
    from pretrain.models import get

    opts = resolve_model_options(dict(section))
    torch.manual_seed(0)
    return get(section["name"])[1](opts)


def _run_dir(root: Path, section: dict, state: dict[str, torch.Tensor]) -> Path:
    """A run folder as the engine leaves it: config.yaml and checkpoints/latest -> step2/model states."""
    tag = root / "checkpoints" / "step2"
    tag.mkdir(parents=True)
    torch.save({"module": state}, tag / MODEL_STATES)
    (root / "checkpoints" / "latest").write_text("step2")
    (root / "config.yaml").write_text(yaml.safe_dump({"model": section}))
    return root


@pytest.fixture(scope="module")
def albef_sources(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("albef")
    state = _build(ALBEF).state_dict()
    export = export_safetensors(state, root / "export.safetensors", {"model": ALBEF, "step": 2})
    return _run_dir(root / "run", ALBEF, state), export


def test_init_source_reads_run_config_and_export_metadata(albef_sources):
    run, export = albef_sources
    assert init_source(run)[0] == "albef" and init_source(run)[1].endswith("config.yaml")
    assert init_source(run / "checkpoints" / "step2")[0] == "albef"
    assert init_source(export) == ("albef", "export.safetensors metadata")


@pytest.mark.parametrize("which", ["run", "export"])
def test_clip_from_albef_weights_is_refused_before_any_copy(albef_sources, which):
    from finetune.backbone import load_backbone_init

    init = albef_sources[0] if which == "run" else albef_sources[1]
    clip = _build(CLIP)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    with pytest.raises(InitMismatchError) as err:
        load_backbone_init(clip, str(init), "clip")
    msg = str(err.value)
    assert "does not match model 'clip'" in msg and "belongs to model 'albef'" in msg
    assert "missing keys (e.g. " in msg and "unexpected keys (e.g. " in msg and "model.init=none" in msg
    assert any(k in msg for k in clip.state_dict())  # names real keys
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())  # nothing was loaded


def test_same_model_loads_every_weight(tmp_path):
    from finetune.backbone import load_backbone_init

    source = _build(CLIP)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    run = _run_dir(tmp_path / "clip_run", CLIP, source.state_dict())
    target = _build(CLIP)
    assert load_backbone_init(target, str(run), "clip") == {"missing": [], "unexpected": []}
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    # a fine-tune run's best weights are backbone.-prefixed: they load too
    best = export_safetensors({f"backbone.{k}": v for k, v in source.state_dict().items()}, tmp_path / "b.safetensors",
                              {"model": CLIP})  # fmt: skip
    assert load_backbone_init(_build(CLIP), str(best), "clip") == {"missing": [], "unexpected": []}


def test_other_size_of_the_same_model_names_the_shapes(tmp_path):
    from finetune.backbone import load_backbone_init

    wide = dict(CLIP, embed_dim=32)
    run = _run_dir(tmp_path / "wide", wide, _build(wide).state_dict())
    with pytest.raises(InitMismatchError, match=r"shape mismatch for \d+ weights.*trained as 'clip'"):
        load_backbone_init(_build(CLIP), str(run), "clip")


def test_higher_resolution_resamples_the_position_embedding(tmp_path):
    """ALBEF fine-tunes at 384 px from a 256 px pretraining: the ViT position grid is resampled bicubically, the
    [CLS] position kept, every other weight copied unchanged."""
    import torch.nn.functional as F

    from finetune.backbone import load_backbone_init

    source = _build(ALBEF)  # 32 px, patch 8: a 4x4 grid + [CLS]
    run = _run_dir(tmp_path / "albef_run", ALBEF, source.state_dict())
    target = _build(dict(ALBEF, image_size=48))  # 6x6
    assert load_backbone_init(target, str(run), "albef") == {"missing": [], "unexpected": []}
    old, new = source.state_dict(), target.state_dict()
    keys = [k for k in old if k.endswith("pos_embed")]
    assert keys and all(new[k].shape == (1, 37, old[k].shape[-1]) for k in keys)
    for k in keys:
        grid = old[k][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
        assert torch.equal(new[k][:, :1], old[k][:, :1])
        assert torch.allclose(new[k][:, 1:], expected.reshape(1, 36, -1), atol=1e-6), k
    assert all(torch.equal(new[k], v) for k, v in old.items() if k not in keys)


def test_finetune_cli_exits_2_with_one_line(albef_sources, tmp_path):
    ann = tmp_path / "test.json"
    ann.write_text(json.dumps([{"image": "a.jpg", "caption": ["a caption"]}]))
    args = [sys.executable, "-m", "finetune", "--config", "configs/finetune/retrieval_synthetic.yaml", "--eval-only",
            f"model.init={albef_sources[0]}", f"task.test_json={ann}", "task.val_json=null", "task.train_json=null",
            f"task.image_root={tmp_path}", f"run.dir={tmp_path / 'ft'}", "model.text.config.num_hidden_layers=1",
            "model.vision.name=vit_tiny_patch16_224", "model.vision.kwargs={depth: 1, patch_size: 8}",
            "model.embed_dim=16", "model.image_size=32", "data.image_size=32"]  # fmt: skip
    proc = subprocess.run(args, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("config error:")]
    assert len(lines) == 1 and "belongs to model 'albef'" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ft" / "results.json").exists()
