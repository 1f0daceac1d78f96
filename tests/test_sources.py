"""Every reader on small files in the real published formats, generated here, and their bad-input cases."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep.build import BuildConfig, run_build
from data_prep.sources import cc3m, coco, img2dataset, jsonlist, sbu, vg
from data_prep.sources.base import Problem, Record
from launch.config import ConfigError, load_config


def _jpeg(path: Path, size=(40, 30), color=(120, 40, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format="JPEG")
    return path


def _cfg(**kw):
    base = dict(annotations=None, images=None, regions=None, image_data=None, tsv=None, shards=None, split=None)
    base.update(kw)
    return type("Src", (), base)()


def _split(items):
    recs = [x for x in items if isinstance(x, Record)]
    probs = [x for x in items if isinstance(x, Problem)]
    return recs, probs


def _build(tmp_path: Path, *overrides: str):
    out = tmp_path / "out"
    cfg = load_config(
        BuildConfig,
        None,
        [f"out.dir={out}", "out.image_size=24", "out.samples_per_shard=4", "workers=0", "progress=false", *overrides],
    )
    return run_build(cfg), out


def _samples(out: Path) -> dict[str, dict]:
    """key → {"jpg": bytes, "json": dict, "txt": str} over every shard of ``out``."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(out.glob("*.tar")):
        for key, s in img2dataset.iter_samples(str(tar_path)):
            samples[key] = {"jpg": s["jpg"], "json": json.loads(s["json"]), "txt": s["txt"].decode()}
    return samples


def test_coco_captions_layout_and_every_bad_input(tmp_path):
    img = tmp_path / "train2017"
    images, anns = [], []
    for i in range(4):
        _jpeg(img / f"{i:012d}.jpg", size=(48 + 8 * i, 36))
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 48 + 8 * i, "height": 36})
        anns += [
            {"id": 10 * i, "image_id": i, "caption": f"cap {i} a"},
            {"id": 10 * i + 1, "image_id": i, "caption": f"  cap {i}   b "},
        ]
    noise = Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48)
    noise.save(img / "full.jpg", format="JPEG")
    full = (img / "full.jpg").read_bytes()
    (img / "000000000004.jpg").write_bytes(full[: len(full) * 2 // 3])  # truncated JPEG: header intact, data cut
    (img / "000000000005.jpg").write_text("this is not an image")
    images += [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (4, 5, 6)]  # 6: missing file
    anns += [{"id": 40 + i, "image_id": i, "caption": f"c{i}"} for i in (4, 5, 6)]
    images.append({"id": 7, "file_name": "000000000007.jpg"})  # no captions
    anns += [
        {"id": 90, "image_id": 0, "caption": ""},  # empty
        {"id": 91, "image_id": 1, "caption": 12},  # non-string
        {"id": 92, "caption": "no image id"},
        {"id": 93, "image_id": 999, "caption": "unknown image"},
    ]
    ann = tmp_path / "captions_train2017.json"
    ann.write_text(json.dumps({"info": {}, "licenses": [], "images": images, "annotations": anns}))
    recs, probs = _split(list(coco.iter_records(_cfg(annotations=str(ann), images=str(img)))))
    assert [r.orig_id for r in recs] == ["0", "1", "2", "3", "4", "5", "6"]
    assert recs[0].captions == ["cap 0 a", "cap 0 b"]  # all captions, whitespace normalised
    assert [p.reason for p in probs] == [
        "empty caption",
        "caption is not a string or list (int)",
        "missing field 'image_id'",
        "unknown image_id",
        "no captions",
    ]
    assert probs[1].row == "annotations[12]" and probs[-1].row == "image_id 7"

    summary, out = _build(tmp_path, "source.format=coco", f"source.annotations={ann}", f"source.images={img}")
    assert summary.samples == 4
    assert summary.failures == {
        "caption is not a string or list (int)": 1,
        "corrupt image": 1,
        "empty caption": 1,
        "missing field 'image_id'": 1,
        "missing file": 1,
        "no captions": 1,
        "not an image": 1,
        "unknown image_id": 1,
    }
    samples = _samples(out)
    metas = [s["json"] for s in samples.values()]
    assert [m["orig_id"] for m in metas] == ["0", "1", "2", "3"]
    m3 = metas[3]
    assert (m3["orig_width"], m3["orig_height"], m3["height"]) == (72, 36, 24) and m3["width"] == 48
    assert m3["captions"] == ["cap 3 a", "cap 3 b"] and m3["source"] == "coco"
    assert [s["txt"] for s in samples.values()] == ["cap 0 a", "cap 1 a", "cap 2 a", "cap 3 a"]


def test_coco_karpathy_layout_split_filter(tmp_path):
    root = tmp_path / "coco"
    entries = []
    for i, split in enumerate(["train", "restval", "val", "test", "train"]):
        folder = "train2014" if split in ("train", "restval") else "val2014"
        _jpeg(root / folder / f"COCO_{i}.jpg")
        entries.append(
            {
                "filepath": folder,
                "filename": f"COCO_{i}.jpg",
                "split": split,
                "cocoid": 1000 + i,
                "sentences": [{"raw": f"Sentence {i}.", "tokens": ["x"]}, {"raw": f"Other {i}."}],
            }
        )
    entries.append(
        {"filepath": "train2014", "filename": "bad.jpg", "split": "train", "cocoid": 9, "sentences": [{"raw": ""}]}
    )
    entries.append({"filepath": "train2014", "split": "train", "sentences": [{"raw": "x"}]})
    ann = tmp_path / "dataset_coco.json"
    ann.write_text(json.dumps({"dataset": "coco", "images": entries}))
    recs, probs = _split(list(coco.iter_records(_cfg(annotations=str(ann), images=str(root), split="train"))))
    assert [r.orig_id for r in recs] == ["1000", "1001", "1004"]  # train + restval
    assert recs[1].path == str(root / "train2014" / "COCO_1.jpg")
    assert recs[0].captions == ["Sentence 0.", "Other 0."] and recs[1].extra["split"] == "restval"
    assert [p.reason for p in probs] == ["empty caption", "missing field 'filename'"]
    recs, _ = _split(list(coco.iter_records(_cfg(annotations=str(ann), images=str(root), split="val,test"))))
    assert [r.orig_id for r in recs] == ["1002", "1003"]
    summary, out = _build(
        tmp_path, "source.format=coco", f"source.annotations={ann}", f"source.images={root}", "source.split=test"
    )
    assert summary.samples == 1 and _samples(out)["000000000"]["json"]["split"] == "test"


def test_coco_rejects_unknown_layout_and_bad_json(tmp_path):
    ann = tmp_path / "x.json"
    ann.write_text(json.dumps([1, 2]))
    with pytest.raises(ConfigError, match="holds a JSON list; expected a COCO captions file"):
        list(coco.iter_records(_cfg(annotations=str(ann), images=str(tmp_path))))
    ann.write_text('{"images": [')
    with pytest.raises(ConfigError, match="source.annotations.*not valid JSON"):
        list(coco.iter_records(_cfg(annotations=str(ann), images=str(tmp_path))))


def test_visual_genome_regions(tmp_path):
    root = tmp_path / "vg"
    _jpeg(root / "VG_100K" / "1.jpg", size=(80, 60))
    _jpeg(root / "VG_100K_2" / "2.jpg", size=(60, 80))
    regions = [
        {
            "id": 1,
            "regions": [
                {"region_id": 11, "image_id": 1, "phrase": "a man", "x": 1, "y": 2, "width": 10, "height": 20},
                {"region_id": 12, "image_id": 1, "phrase": "a  man ", "x": 5, "y": 5, "width": 10, "height": 10},
                {"region_id": 13, "image_id": 1, "phrase": "red shirt", "x": 3, "y": 4, "width": 5, "height": 6},
                {"region_id": 14, "image_id": 1, "phrase": "", "x": 3, "y": 4, "width": 5, "height": 6},
            ],
        },
        {"id": 2, "regions": [{"region_id": 21, "phrase": "a dog", "x": 0, "y": 0, "width": 30, "height": 30}]},
        {"id": 3, "regions": [{"region_id": 31, "phrase": 5, "x": 0, "y": 0, "width": 3, "height": 3}]},
        {"id": 4, "regions": [{"region_id": 41, "phrase": "lost", "x": 0, "y": 0, "width": 3, "height": 3}]},
        "garbage",
    ]
    reg = tmp_path / "region_descriptions.json"
    reg.write_text(json.dumps(regions))
    data = tmp_path / "image_data.json"
    data.write_text(json.dumps([{"image_id": 1, "coco_id": 77, "flickr_id": None, "url": "http://x/1.jpg"}]))
    recs, probs = _split(list(vg.iter_records(_cfg(regions=str(reg), image_data=str(data), images=str(root)))))
    assert [r.orig_id for r in recs] == ["1", "2", "4"]
    assert recs[0].captions == ["a man", "red shirt"]  # distinct phrases, empty one dropped
    assert [r["id"] for r in recs[0].extra["regions"]] == [11, 12, 13]
    assert recs[0].extra["coco_id"] == 77 and "flickr_id" not in recs[0].extra
    assert recs[1].path == str(root / "VG_100K_2" / "2.jpg")
    assert [p.reason for p in probs] == ["no region phrases", "row is not an object"]

    summary, out = _build(
        tmp_path, "source.format=vg", f"source.regions={reg}", f"source.image_data={data}", f"source.images={root}"
    )
    assert summary.samples == 2 and summary.failures == {
        "missing file": 1,
        "no region phrases": 1,
        "row is not an object": 1,
    }
    meta = _samples(out)["000000000"]["json"]
    assert meta["regions"][2] == {"id": 13, "phrase": "red shirt", "x": 3, "y": 4, "width": 5, "height": 6}
    assert (meta["orig_width"], meta["orig_height"], meta["width"], meta["height"]) == (80, 60, 32, 24)


def test_sbu_reader(tmp_path):
    ann = tmp_path / "sbu-captions-all.json"
    ann.write_text(
        json.dumps(
            {
                "image_urls": ["http://a/1.jpg", "http://a/2.jpg", "", "http://a/4.jpg", "http://a/5.jpg"],
                "captions": ["first", ["second"], "third", "   ", None, "orphan caption"],
                "user_ids": ["u1", "u2", "u3", "u4", "u5"],
            }
        )
    )
    recs, probs = _split(list(sbu.iter_records(_cfg(annotations=str(ann)))))
    assert [(r.orig_id, r.url, r.captions, r.extra["user_id"]) for r in recs] == [
        ("0", "http://a/1.jpg", ["first"], "u1"),
        ("1", "http://a/2.jpg", ["second"], "u2"),
    ]
    assert [(p.row, p.reason) for p in probs] == [
        ("row 2", "bad url"),
        ("row 3", "empty caption"),
        ("row 4", "caption is not a string or list (NoneType)"),
        ("row 5", "missing field 'image_urls'"),
    ]
    ann.write_text(json.dumps({"captions": []}))
    with pytest.raises(ConfigError, match="not an SBU file"):
        list(sbu.iter_records(_cfg(annotations=str(ann))))


def test_cc3m_reader(tmp_path):
    tsv = tmp_path / "Train_GCC-training.tsv"
    tsv.write_bytes(
        b"a photo of a cat\thttp://x/1.jpg\n"
        b"no url column\n"
        b"\n"
        b"\t http://x/3.jpg\n"
        b"bad \xff utf8\thttp://x/4.jpg\n"
        b"caption\twith\ttabs\n"
        b"last one\thttp://x/6.jpg\r\n"
    )
    items = list(cc3m.iter_records(_cfg(tsv=str(tsv))))
    recs, probs = _split(items)
    assert [(r.orig_id, r.captions, r.url) for r in recs] == [
        ("0", ["a photo of a cat"], "http://x/1.jpg"),
        ("5", ["last one"], "http://x/6.jpg"),
    ]
    assert [(p.row, p.reason) for p in probs] == [
        ("line 2", "wrong column count (1, expected 2)"),
        ("line 4", "empty caption"),
        ("line 5", "not utf-8"),
        ("line 6", "wrong column count (3, expected 2)"),
    ]
    tsv.write_text("caption\turl\nhello\thttp://x/a.jpg\n")  # header added for img2dataset is skipped
    assert [r.orig_id for r in cc3m.iter_records(_cfg(tsv=str(tsv)))] == ["0"]


def test_jsonlist_list_and_lines(tmp_path):
    root = tmp_path / "images"
    _jpeg(root / "a.jpg")
    _jpeg(root / "sub" / "b.jpg")
    items = [
        {"image": "a.jpg", "caption": "one caption", "image_id": 5},
        {"image": "sub/b.jpg", "caption": ["first", "second", ""]},
        {"image": "a.jpg", "caption": 3},
        {"image": "a.jpg", "caption": ["ok", 4]},
        {"caption": "no image"},
        {"image": "a.jpg"},
        ["not", "a", "dict"],
        {"image": "http://host/c.jpg", "caption": "remote"},
    ]
    ann = tmp_path / "coco.json"
    ann.write_text(json.dumps(items))
    recs, probs = _split(list(jsonlist.iter_records(_cfg(annotations=str(ann), images=str(root)))))
    assert [(r.orig_id, r.captions) for r in recs] == [
        ("5", ["one caption"]),
        ("sub/b.jpg", ["first", "second"]),
        ("http://host/c.jpg", ["remote"]),
    ]
    assert recs[0].path == str(root / "a.jpg") and recs[2].url == "http://host/c.jpg" and recs[2].path is None
    assert [(p.row, p.reason) for p in probs] == [
        ("[2]", "caption is not a string or list (int)"),
        ("[3]", "caption is not a string (int)"),
        ("[4]", "missing field 'image'"),
        ("[5]", "missing field 'caption'"),
        ("[6]", "row is not an object"),
    ]
    lines = tmp_path / "coco.jsonl"
    lines.write_text(
        '{"image": "a.jpg", "caption": "x"}\n{"image": "a.jpg", "caption": \n\n{"image": "sub/b.jpg", "caption": "y"}\n'
    )
    recs, probs = _split(list(jsonlist.iter_records(_cfg(annotations=str(lines), images=str(root)))))
    assert [r.captions for r in recs] == [["x"], ["y"]]
    assert [(p.row, p.reason) for p in probs] == [("line 2", "bad JSON line")]
    summary, out = _build(tmp_path, "source.format=jsonlist", f"source.annotations={lines}", f"source.images={root}")
    assert summary.samples == 2 and summary.failures == {"bad JSON line": 1}
    assert sorted(_samples(out)) == ["000000000", "000000002"]  # the bad line keeps its slot


def _i2d_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__'].decode()}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_img2dataset_shards_as_input(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (5, 250, 5)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    meta = {"url": "http://h/0.jpg", "key": "000000000", "status": "success", "width": 64, "height": 32, "exif": "{}"}
    src = tmp_path / "in"
    src.mkdir()
    _i2d_tar(
        src / "00000.tar",
        [
            {"__key__": b"000000000", "jpg": jpg, "txt": b"a green banner", "json": json.dumps(meta).encode()},
            {"__key__": b"000000001", "jpg": jpg, "json": b"{}"},  # no caption at all
            {"__key__": b"000000002", "txt": b"caption without image"},
            {"__key__": b"000000003", "jpg": b"\x00corrupt", "txt": b"bad bytes"},
        ],
    )
    (src / "00001.tar").write_bytes(b"this is not a tar file" * 40)
    recs, probs = _split(list(img2dataset.iter_records(_cfg(shards=str(src / "{00000..00001}.tar")))))
    assert [(r.orig_id, r.captions, r.extra) for r in recs] == [
        ("000000000", ["a green banner"], {"url": "http://h/0.jpg"}),
        ("000000003", ["bad bytes"], {}),
    ]
    assert [p.reason for p in probs] == ["empty caption", "missing image", "corrupt tar (ReadError)"]
    summary, out = _build(tmp_path, "source.format=img2dataset", f"source.shards={src}/*.tar", "out.resize_mode=pad")
    assert summary.samples == 1
    assert summary.failures == {"corrupt tar (ReadError)": 1, "empty caption": 1, "missing image": 1, "not an image": 1}
    s = _samples(out)["000000000"]
    assert s["json"]["captions"] == ["a green banner"] and s["json"]["url"] == "http://h/0.jpg"
    assert (s["json"]["width"], s["json"]["height"]) == (24, 24)  # pad mode: square


def test_synthetic_format_builds(tmp_path):
    pytest.importorskip("data_prep.sources.synthetic")
    summary, out = _build(tmp_path, "source.format=synthetic", "source.num_images=5", "source.seed=3")
    assert summary.samples == 5 and summary.failed == 0
    metas = [s["json"] for s in _samples(out).values()]
    assert all(m["source"] == "synthetic" and m["captions"] and m["width"] == 24 for m in metas)


def test_config_errors_before_any_work(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="source.annotations: path does not exist"):
        load_config(
            BuildConfig, None, ["source.format=jsonlist", f"source.annotations={tmp_path}/nope.json", f"out.dir={out}"]
        )
    with pytest.raises(ConfigError, match="source.tsv: required for source.format=cc3m"):
        load_config(BuildConfig, None, ["source.format=cc3m"])
    with pytest.raises(ConfigError, match="source.images: image folder does not exist"):
        load_config(BuildConfig, None, ["source.format=vg", f"source.regions={tmp_path}", "source.images=/nope"])
    with pytest.raises(ConfigError, match="source.shards: no shard files match"):
        load_config(BuildConfig, None, ["source.format=img2dataset", f"source.shards={tmp_path}/*.tar"])
    with pytest.raises(ConfigError, match="out.resize_mode"):
        load_config(BuildConfig, None, ["source.format=synthetic", "out.resize_mode=stretch"])
    with pytest.raises(ConfigError, match="unknown config key 'source.annotation'"):
        load_config(BuildConfig, None, ["source.annotation=x"])
    assert not out.exists()


def test_shipped_recipes_parse(tmp_path):
    names = ("coco", "coco_karpathy", "vg", "sbu", "cc3m", "jsonlist", "img2dataset")
    for path in [Path("configs/data_prep") / f"{n}.yaml" for n in names]:
        cfg = load_config(BuildConfig, path, [f"source.images={tmp_path}"], check_paths=False)
        assert cfg.source.format in ("coco", "vg", "sbu", "cc3m", "jsonlist", "img2dataset", "synthetic"), path
