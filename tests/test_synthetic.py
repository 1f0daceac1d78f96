"""The built-in synthetic set: determinism, captions/derivations true to the scene, rendering, the CLI."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from data_prep.sources import synthetic as S
from data_prep.sources.synthetic import Scene, SceneObject


def _obj(shape, colour, size="small", texture="solid", box=(0.0, 0.0, 0.15, 0.15)):
    return SceneObject(shape=shape, colour=colour, size=size, texture=texture, box=box)


# Boxes inside distinct grid cells: top left, top right, bottom left, center.
TL = (0.02, 0.02, 0.30, 0.30)
TR = (0.70, 0.05, 0.85, 0.20)
BL = (0.05, 0.75, 0.20, 0.90)
CE = (0.40, 0.40, 0.55, 0.55)


# ------------------------------------------------------------------------------------------- determinism


def test_same_seed_same_images_and_captions_different_split_differs():
    a = list(S.iter_records(12, seed=3, split="train", image_size=32))
    b = list(S.iter_records(12, seed=3, split="train", image_size=32))
    assert [r.orig_id for r in a] == [f"synthetic-train-{i:07d}" for i in range(12)]
    for ra, rb in zip(a, b):
        assert ra.data.tobytes() == rb.data.tobytes()
        assert ra.captions == rb.captions and ra.extra == rb.extra
    val = list(S.iter_records(12, seed=3, split="val", image_size=32))
    other_seed = list(S.iter_records(12, seed=4, split="train", image_size=32))
    train_imgs = {r.data.tobytes() for r in a}
    assert not train_imgs & {r.data.tobytes() for r in val}
    assert sum(r.data.tobytes() in train_imgs for r in other_seed) <= 1
    # Any image regenerates alone (per-image rng): image 7 equals the 8th of the stream.
    scene, caps, img = S.make_example(3, "train", 7, image_size=32)
    assert img.tobytes() == a[7].data.tobytes() and caps == a[7].captions


def test_records_carry_scene_label_domain_and_five_captions():
    recs = list(S.iter_records(30, seed=0, image_size=32))
    for r in recs:
        assert r.data.size == (32, 32) and r.data.mode == "RGB"
        assert len(r.captions) == 5 and len(set(r.captions)) == 5
        scene = S.scene_from_dict(r.extra["scene"])
        assert r.extra["label"] == S.class_label(scene)
        assert r.extra["domain"] == scene.domain and r.extra["split"] == "train"
    # domain=None mixes domains; a fixed domain is honoured.
    assert len({r.extra["domain"] for r in recs}) == len(S.DOMAINS)
    assert {r.extra["domain"] for r in S.iter_records(10, 0, image_size=32, domain="pastel")} == {"pastel"}
    with pytest.raises(ValueError, match="unknown synthetic domain 'sepia'"):
        next(S.iter_records(1, 0, domain="sepia"))


# ------------------------------------------------------------------------------------------- captions

_NP = re.compile(
    r"\b(?:(small|large) )?(?:(solid|striped|dotted) )?(" + "|".join(S.COLOURS) + r") (" + "|".join(S.SHAPES) + r")\b"
)
_COUNT = re.compile(r"\b(one|two|three) (" + "|".join(list(S.SHAPES) + list(S.PLURALS.values())) + r")\b")


def _singular(word):
    return next(s for s, p in S.PLURALS.items() if word in (s, p))


def test_captions_agree_with_scene():
    rng = random.Random(11)
    for _ in range(300):
        scene = S.sample_scene(rng, domain=rng.choice(sorted(S.DOMAINS)))
        colours = {o.colour for o in scene.objects}
        shapes = Counter(o.shape for o in scene.objects)
        for cap in S.captions(scene, rng):
            words = set(cap.split())
            assert words & (set(S.COLOURS) | set(S.SHAPES) | set(S.PLURALS.values())), cap
            assert words & set(S.COLOURS) <= colours, cap
            assert {_singular(w) for w in words & (set(S.SHAPES) | set(S.PLURALS.values()))} <= set(shapes), cap
            assert words & set(S.BACKGROUNDS) <= {scene.background}, cap
            # Every "[size] [texture] colour shape" phrase describes a real object.
            for size, texture, colour, shape in _NP.findall(cap):
                assert any(
                    o.colour == colour and o.shape == shape and size in ("", o.size) and texture in ("", o.texture)
                    for o in scene.objects
                ), (cap, S.scene_to_dict(scene))
            for number, noun in _COUNT.findall(cap):
                if not cap.startswith("a single"):
                    assert shapes[_singular(noun)] == ("one", "two", "three").index(number) + 1, cap
            m = re.match(r"(one|two|three) shapes:", cap)
            if m:
                assert len(scene.objects) == ("one", "two", "three").index(m.group(1)) + 1


def test_caption_relations_and_counts_on_hand_built_scene():
    # Red circle top left, blue square top right: the circle is left of the square.
    scene = Scene([_obj("circle", "red", "large", box=TL), _obj("square", "blue", box=TR)], "white")
    seen = set()
    for seed in range(60):
        for cap in S.captions(scene, random.Random(seed)):
            seen.add(cap)
            if " left of " in cap:
                assert cap.index("circle") < cap.index("left of") < cap.index("square"), cap
            if " right of " in cap:
                assert cap.index("square") < cap.index("right of") < cap.index("circle"), cap
            assert "above" not in cap and "below" not in cap, cap
    assert any("one circle and one square" in c for c in seen)
    assert any("in the top left corner" in c and "circle" in c for c in seen)
    two = Scene([_obj("circle", "red", box=TL), _obj("circle", "green", "large", box=BL)], "gray")
    counts = {c for seed in range(40) for c in S.captions(two, random.Random(seed)) if "circles" in c}
    assert counts and all("two circles" in c for c in counts)


# ------------------------------------------------------------------------------------------- rendering


def test_render_puts_object_colour_inside_its_box_only():
    size = 64
    scene = Scene(
        [_obj("square", "red", "large", box=TL), _obj("circle", "blue", box=TR), _obj("star", "yellow", box=BL)],
        "black",
    )
    img = np.asarray(S.render(scene, size))
    pal = S.DOMAINS["plain"].palette
    bg = S.DOMAINS["plain"].backgrounds["black"]
    inside = np.zeros((size, size), dtype=bool)
    for o in scene.objects:
        x0, y0, x1, y1 = S.pixel_box(o.box, size)
        inside[y0:y1, x0:x1] = True
        patch = img[y0:y1, x0:x1]
        is_col = (patch == pal[o.colour]).all(-1)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        assert tuple(img[cy, cx]) == pal[o.colour], o
        # Only its colour or the background in the box; enough of the box is covered.
        assert (is_col | (patch == bg).all(-1)).all()
        assert is_col.mean() > {"square": 0.99, "circle": 0.7, "star": 0.25}[o.shape], (o.shape, is_col.mean())
    assert (img[~inside] == bg).all()
    # The square fills its box exactly.
    x0, y0, x1, y1 = S.pixel_box(TL, size)
    assert (img[y0:y1, x0:x1] == pal["red"]).all()


def test_textures_mix_object_colour_and_its_shade():
    dom = S.DOMAINS["plain"]
    for texture in ("striped", "dotted"):
        scene = Scene([_obj("square", "green", "large", texture=texture, box=TL)], "white")
        img = np.asarray(S.render(scene, 96))
        x0, y0, x1, y1 = S.pixel_box(TL, 96)
        patch = img[y0:y1, x0:x1].reshape(-1, 3)
        dark = np.array([int(c * dom.shade) for c in dom.palette["green"]])
        is_col = (patch == dom.palette["green"]).all(-1)
        is_dark = (patch == dark).all(-1)
        assert (is_col | is_dark).all()
        assert 0.5 < is_col.mean() < 0.95, (texture, is_col.mean())


def test_small_renders_work_for_every_shape():
    for shape in S.SHAPES:
        scene = Scene([_obj(shape, "orange", box=CE)], "white")
        for size in (32, 48):
            img = np.asarray(S.render(scene, size))
            assert ((img == S.DOMAINS["plain"].palette["orange"]).all(-1)).sum() >= 4, (shape, size)


# ------------------------------------------------------------------------------------------- domains, labels


def test_domains_change_palette_and_textures_not_labels():
    scene = Scene([_obj("circle", "red", "large", box=TL), _obj("cross", "blue", box=BL)], "gray")
    pastel = Scene(scene.objects, "gray", domain="pastel")
    a, b = np.asarray(S.render(scene, 64)), np.asarray(S.render(pastel, 64))
    assert not np.array_equal(a, b)
    cy = cx = (S.pixel_box(TL, 64)[0] + S.pixel_box(TL, 64)[2]) // 2
    assert tuple(b[cy, cx]) == S.DOMAINS["pastel"].palette["red"] != S.DOMAINS["plain"].palette["red"]
    assert S.class_label(scene) == S.class_label(pastel) == "circle"
    with pytest.raises(ValueError, match="not offered by domain 'pastel'"):
        S.render(Scene(scene.objects, "white", domain="pastel"), 32)
    # Texture distribution shifts by domain; label vocabulary stays the shapes.
    rng = random.Random(0)
    share = {}
    for dom in ("plain", "striped"):
        scenes = [S.sample_scene(rng, domain=dom) for _ in range(300)]
        objs = [o for s in scenes for o in s.objects]
        share[dom] = sum(o.texture != "solid" for o in objs) / len(objs)
        assert {S.class_label(s) for s in scenes} == set(S.CLASSES)
    assert share["plain"] < 0.45 < 0.75 < share["striped"]


def test_class_label_is_largest_object_and_unambiguous():
    scene = Scene([_obj("circle", "red", box=TR), _obj("star", "blue", "large", box=TL)], "white")
    assert S.class_label(scene) == "star"
    rng = random.Random(5)
    for _ in range(300):
        s = S.sample_scene(rng)
        areas = sorted((o.area for o in s.objects), reverse=True)
        assert len(areas) == 1 or areas[0] > areas[1] * 1.5
        assert sum(o.size == "large" for o in s.objects) == (1 if len(s.objects) > 1 else s.objects[0].size == "large")
        cells = [o.region for o in s.objects]
        assert len(set(cells)) == len(cells)


def test_scene_dict_roundtrip_and_bad_rows():
    rng = random.Random(2)
    scene = S.sample_scene(rng, domain="striped")
    assert S.scene_from_dict(json.loads(json.dumps(S.scene_to_dict(scene)))) == scene
    bad = S.scene_to_dict(scene)
    bad["objects"][0]["colour"] = "mauve"
    with pytest.raises(ValueError, match=r"objects\[0\]\.colour: 'mauve'"):
        S.scene_from_dict(bad)
    with pytest.raises(ValueError, match="lacks key 'background'"):
        S.scene_from_dict({"objects": []})


# ------------------------------------------------------------------------------------------- derivations


def test_vqa_answers_on_hand_built_scene():
    scene = Scene(
        [_obj("circle", "red", "large", box=TL), _obj("circle", "red", box=TR), _obj("square", "blue", box=BL)],
        "gray",
    )
    for seed in range(20):
        qa = dict(S.vqa_questions(scene, random.Random(seed)))
        assert all(a in S.VQA_ANSWERS for a in qa.values())
        assert qa[next(q for q in qa if q.startswith("how many objects") or q.startswith("how many shapes"))] == "3"
        if "how many circles are there?" in qa:
            assert qa["how many circles are there?"] == "2"
        if "how many squares are there?" in qa:
            assert qa["how many squares are there?"] == "1"
        assert qa["what colour is the square?"] == "blue"
        assert "what colour is the circle?" not in qa  # two circles: the question would be ambiguous
        assert qa["what shape is the blue object?"] == "square"
        assert qa["where is the large circle?"] == "top left"
        assert qa["where is the small circle?"] == "top right"
        assert qa["where is the blue square?"] == "bottom left"
        assert qa["what colour is the background?"] == "gray"
        yn = Counter(a for a in qa.values() if a in ("yes", "no"))
        assert yn["yes"] == yn["no"] == 2
        for q, a in qa.items():
            m = re.fullmatch(r"is there an? (\w+) (\w+)\?", q)
            if m:
                present = any((o.colour, o.shape) == m.groups() for o in scene.objects)
                assert a == ("yes" if present else "no"), q
            m = re.fullmatch(r"how many (\w+) are there\?", q)
            if m and m.group(1) not in ("objects", "shapes"):
                assert a == str(sum(o.shape == _singular(m.group(1)) for o in scene.objects)), q


def _parse_ref(expr):
    words = expr.split()
    assert words[0] == "the"
    return words[1:]


def test_referring_expressions_unique_with_boxes():
    same = Scene([_obj("circle", "red", box=TL), _obj("circle", "red", box=TR)], "white")
    refs = S.referring_expressions(same)
    assert refs == [
        ("the small red circle in the top left corner", TL),
        ("the small red circle in the top right corner", TR),
    ]
    sizes = Scene(
        [_obj("circle", "red", "large", box=TL), _obj("circle", "red", box=TR), _obj("star", "red", box=BL)], "white"
    )
    assert S.referring_expressions(sizes) == [
        ("the large circle", TL),
        ("the small circle", TR),
        ("the red star", BL),
    ]
    rng = random.Random(9)
    for _ in range(300):
        scene = S.sample_scene(rng)
        refs = S.referring_expressions(scene)
        assert [b for _, b in refs] == [o.box for o in scene.objects]
        assert len({e for e, _ in refs}) == len(refs)
        for expr, box in refs:
            assert all(0.0 <= v <= 1.0 for v in box) and box[0] < box[2] and box[1] < box[3]
            words = set(_parse_ref(expr))
            matching = [
                o
                for o in scene.objects
                if o.shape in words
                and all(
                    w in (o.colour, o.size, o.texture, o.shape) for w in words & set(S.COLOURS + S.SIZES + S.TEXTURES)
                )
                and (
                    " in the " not in expr
                    and " at the " not in expr
                    and " on the " not in expr
                    or S._where(o.region) in expr
                )
            ]
            assert [o.box for o in matching] == [box], (expr, S.scene_to_dict(scene))


def test_nlvr_statement_truth_values():
    left = Scene([_obj("circle", "red", box=TL), _obj("circle", "blue", "large", box=TR)], "white")
    right = Scene(
        [_obj("circle", "green", box=TL), _obj("square", "red", "large", box=BL), _obj("star", "red", box=CE)], "black"
    )
    expected = {
        "the left image has more circles than the right image": True,
        "the right image has more circles than the left image": False,
        "both images contain a circle": True,
        "both images contain a square": False,
        "both images contain a star": False,
        "only the left image contains a square": False,
        "the two images contain exactly three circles in total": True,
        "the two images contain exactly four circles in total": False,
        "the two images contain exactly one square in total": True,
        "both images contain a red object": True,
        "both images contain a blue object": False,
        "neither image contains a green object": False,
        "only the right image contains a green object": True,
        "the right image has more objects than the left image": True,
        "both images contain the same number of objects": False,
        "the right image contains exactly three objects": True,
        "the left image contains exactly three objects": False,
        "both images have a white background": False,
    }
    seen = {}
    for seed in range(60):
        out = S.nlvr_statements(left, right, random.Random(seed), n=6)
        assert len(out) == 6 and sum(t for _, t in out) == 3
        seen.update(out)
    for text, truth in expected.items():
        assert seen.get(text, truth) == truth, text
    assert len(set(expected) & set(seen)) >= 12


def test_entailment_labels():
    scene = Scene([_obj("triangle", "yellow", "large", box=TL), _obj("square", "purple", box=TR)], "white")
    for seed in range(30):
        out = S.entailment(scene, random.Random(seed))
        assert Counter(lbl for _, lbl in out) == {"entailment": 2, "neutral": 2, "contradiction": 2}
        for hyp, label in out:
            assert label in S.ENTAILMENT_LABELS
            m = re.fullmatch(r"there is an? (\w+) (\w+)", hyp)
            if m:
                present = m.groups() in {("yellow", "triangle"), ("purple", "square")}
                assert label == ("entailment" if present else "contradiction"), hyp
            if re.fullmatch(r"there (is|are) \w+ shapes? in the image", hyp):
                assert ("two shapes" in hyp) == (label == "entailment"), hyp
            if hyp.startswith("the background is"):
                assert (hyp == "the background is white") == (label == "entailment"), hyp
            if "left of" in hyp or "right of" in hyp:
                assert ("triangle is left of" in hyp) == (label == "entailment"), hyp
            if label == "neutral":
                # Unverifiable property of an object that IS in the image.
                assert "yellow triangle" in hyp or "purple square" in hyp, hyp


# ------------------------------------------------------------------------------------------- the command


def _tar_members(path):
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_main_writes_split_shards_and_json_deterministically(tmp_path, capsys):
    import io

    from PIL import Image

    from data_prep.synthetic import main

    args = ["out.image_size=32", "out.samples_per_shard=16", "splits.train=40", "splits.val=10", "splits.test=0"]
    args += ["workers=0", "seed=7"]
    out = tmp_path / "syn"
    assert main(["--config", "configs/data_prep/synthetic.yaml", f"out.dir={out}", *args]) == 0
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert sorted(p.name for p in (out / "val").glob("*.tar")) == ["00000.tar"]
    assert not (out / "test").exists() and not (out / "test_retrieval.json").exists()
    manifest = json.loads((out / "train" / "manifest.json").read_text())
    assert manifest["num_samples"] == 40 and manifest["source"] == "synthetic"

    retrieval = json.loads((out / "train_retrieval.json").read_text())
    scenes = [json.loads(line) for line in (out / "train_scenes.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in retrieval] == list(range(40)) == [s["image_id"] for s in scenes]
    tars = {name: _tar_members(out / "train" / name) for name in ("00000.tar", "00001.tar", "00002.tar")}
    for entry, row in zip(retrieval, scenes):
        shard_name, member = entry["image"].split("/")[1:]
        assert entry["shard"] == f"train/{shard_name}" and member == entry["key"] + ".jpg"
        meta = json.loads(tars[shard_name][entry["key"] + ".json"])
        assert meta["captions"] == entry["caption"] == row["captions"] and len(entry["caption"]) == 5
        assert meta["scene"] == row["scene"] and meta["label"] == row["label"] and row["key"] == entry["key"]
        assert tars[shard_name][entry["key"] + ".txt"].decode() == entry["caption"][0]
        # The stored JPEG is the rendering of the recorded scene (up to compression).
        img = np.asarray(Image.open(io.BytesIO(tars[shard_name][member])).convert("RGB"), dtype=np.int16)
        ref = np.asarray(S.render(S.scene_from_dict(row["scene"]), 32), dtype=np.int16)
        assert img.shape == (32, 32, 3) and np.abs(img - ref).mean() < 6
    assert retrieval[17]["key"] == "000010001"  # shard 1, index 1
    val = json.loads((out / "val_retrieval.json").read_text())
    assert {r["orig_id"] for r in val} == {f"synthetic-val-{i:07d}" for i in range(10)}

    # Same config into a fresh folder: byte-identical shards and json (stats differ only in timings).
    again = tmp_path / "again"
    assert main(["--config", "configs/data_prep/synthetic.yaml", f"out.dir={again}", *args]) == 0
    a, b = _files(out), _files(again)
    assert a.keys() == b.keys()
    differing = {k for k in a if a[k] != b[k]}
    assert all(k.endswith("_stats.json") for k in differing)

    # A rerun resumes (skips done shards); other content settings into the same folder are refused.
    assert main(["--config", "configs/data_prep/synthetic.yaml", f"out.dir={out}", *args]) == 0
    assert _files(out) == a
    capsys.readouterr()
    assert main(["--config", "configs/data_prep/synthetic.yaml", f"out.dir={out}", *args, "seed=8"]) == 2
    assert "seed: 7 vs 8" in capsys.readouterr().err
    assert main(["--config", "configs/data_prep/synthetic.yaml", f"out.dir={out}", *args, "domain=sepia"]) == 2
    assert "domain: 'sepia'" in capsys.readouterr().err


def _consistent(cap, scene):
    """Whether a caption could describe ``scene`` judging by its colour/shape words and noun phrases."""
    words = set(cap.split())
    shapes = {o.shape for o in scene.objects}
    if not words & set(S.COLOURS) <= {o.colour for o in scene.objects}:
        return False
    if not {_singular(w) for w in words & (set(S.SHAPES) | set(S.PLURALS.values()))} <= shapes:
        return False
    if not words & set(S.BACKGROUNDS) <= {scene.background}:
        return False
    return all(
        any(o.colour == c and o.shape == s and z in ("", o.size) and t in ("", o.texture) for o in scene.objects)
        for z, t, c, s in _NP.findall(cap)
    )


def test_captions_discriminate_images():
    # The signal a retrieval model learns: a caption fits its own image and only a few of 100 others.
    recs = list(S.iter_records(100, seed=1, image_size=32))
    scenes = [S.scene_from_dict(r.extra["scene"]) for r in recs]
    fits = []
    for i, r in enumerate(recs):
        for cap in r.captions:
            assert _consistent(cap, scenes[i]), cap
            fits.append(sum(_consistent(cap, s) for j, s in enumerate(scenes) if j != i))
    assert np.mean(fits) < 5, np.mean(fits)
    # All five captions together pin the image down almost uniquely.
    joint = [sum(all(_consistent(c, s) for c in r.captions) for s in scenes) for r in recs]
    assert np.mean(joint) < 1.5, np.mean(joint)
