"""Web-like caption knobs of the synthetic set: deterministic, image-preserving, rates as asked, refused if invalid."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import REPO

from data_prep.sources.synthetic import DISTRACTOR_WORDS, WebCaptions, make_example, sample_scene, web_captions, web_rng


def _words(captions: list[str]) -> set[str]:
    return {w for c in captions for w in c.replace(",", " ").split()}


def test_zero_knobs_keep_captions_and_every_knob_keeps_the_image():
    web = WebCaptions(partial=1.0, distractor=1.0, mismatch=0.5, length_spread=1.0)
    for i in range(20):
        scene, clean, image = make_example(3, "train", i, 32)
        scene0, same, image0 = make_example(3, "train", i, 32, web=WebCaptions())
        scene_w, noisy, image_w = make_example(3, "train", i, 32, web=web)
        assert same == clean and scene0 == scene
        assert scene_w == scene and np.array_equal(np.asarray(image_w), np.asarray(image))
        assert noisy == make_example(3, "train", i, 32, web=web)[1]  # deterministic from the seed
        assert len(noisy) == len(clean) and all(c.strip() for c in noisy)


def test_rates_are_what_was_asked():
    n = 400
    mism, distract, partial_single = 0, 0, 0
    for i in range(n):
        scene, clean, _ = make_example(0, "train", i, 32)
        caps = web_captions(scene, clean, web_rng(0, "train", i), WebCaptions(mismatch=0.3))
        # A mismatched image's captions come from another scene: they share fewer colour words with the real one.
        colours = {o.colour for o in scene.objects}
        mism += not any(c in _words(caps) for c in colours)
        caps = web_captions(scene, clean, web_rng(0, "train", i), WebCaptions(distractor=0.5))
        distract += sum(bool(_words([c]) & set(DISTRACTOR_WORDS)) for c in caps)
        if len(scene.objects) > 1:
            caps = web_captions(scene, clean, web_rng(0, "train", i), WebCaptions(partial=1.0))
            shapes = [o.shape for o in scene.objects]
            if len(set(shapes)) == len(shapes):  # distinct shapes: a partial caption names exactly one of them
                assert all(sum(s in c.split() for s in shapes) == 1 for c in caps), caps
                partial_single += 1
    # colour-word overlap only detects part of the mismatches (a new scene may share a colour): between 0.1 and 0.3
    assert 0.1 * n < mism <= 0.3 * n + 30
    assert abs(distract / (5 * n) - 0.5) < 0.06
    assert partial_single > 0.2 * n


def test_partial_names_one_object_and_length_spreads():
    import random

    rng = random.Random(0)
    lengths_clean, lengths_web = [], []
    for _ in range(200):
        scene = sample_scene(rng, num_objects=3)
        long_caps = [" ".join(["word"] * 8)] * 5
        lengths_clean += [len(c.split()) for c in long_caps]
        lengths_web += [len(c.split()) for c in web_captions(scene, long_caps, rng, WebCaptions(length_spread=1.0))]
    assert np.std(lengths_web) > 1.5 and np.std(lengths_clean) == 0
    assert min(lengths_web) >= 2 and max(lengths_web) > 8


def _build(out, *extra: str):
    from data_prep.synthetic import SyntheticConfig, run
    from launch.config import load_config

    cfg = load_config(
        SyntheticConfig, "configs/data_prep/synthetic.yaml",
        [f"out.dir={out}", "out.image_size=32", "out.samples_per_shard=16", "splits.train=16", "splits.val=4",
         "splits.test=4", *extra],
    )  # fmt: skip
    run(cfg)
    return out


def test_command_applies_knobs_to_train_only_and_refuses_bad_rates(tmp_path, monkeypatch):
    from launch.config import ConfigError

    monkeypatch.chdir(REPO)
    clean = _build(tmp_path / "clean")
    web = _build(
        tmp_path / "web", "web.partial=0.5", "web.distractor=0.5", "web.mismatch=0.25", "web.length_spread=0.5"
    )
    read = lambda root, split: [r["caption"] for r in json.loads((root / f"{split}_retrieval.json").read_text())]  # noqa: E731
    assert read(clean, "test") == read(web, "test") and read(clean, "val") == read(web, "val")
    assert read(clean, "train") != read(web, "train")
    manifest = json.loads((web / "train" / "manifest.json").read_text())
    assert manifest["build_config"]["web"]["mismatch"] == 0.25
    assert "web" not in json.loads((clean / "train" / "manifest.json").read_text())["build_config"]
    with pytest.raises(ConfigError, match="web.mismatch"):
        _build(tmp_path / "bad", "web.mismatch=1.5")
    with pytest.raises(ConfigError, match="was built with different settings"):
        _build(tmp_path / "clean", "web.partial=0.5")  # a folder never mixes regimes
