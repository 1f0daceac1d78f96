"""Reads stay inside the image root and tar member names come from validated keys, in every reader and writer."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from data_prep.paths import OUTSIDE_ROOT, UNSAFE_KEY, PathError, check_member_key, resolve_in_root
from data_prep.shards import ShardWriter
from data_prep.sources import coco, jsonlist, vg
from data_prep.sources.base import Problem, Record
from launch.config import ConfigError


def _jpeg(path: Path, color=(10, 200, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), color).save(path, format="JPEG")
    return path


def _cfg(**kw):
    base = dict(annotations=None, images=None, regions=None, image_data=None, split=None)
    base.update(kw)
    return type("Src", (), base)()


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """An image root holding ok.jpg and sub/ok2.jpg, and a secret file beside (outside) the root."""
    root = tmp_path / "data" / "images"
    _jpeg(root / "ok.jpg")
    _jpeg(root / "sub" / "ok2.jpg")
    secret = _jpeg(tmp_path / "secret.jpg", color=(255, 0, 0))
    return root, secret


ESCAPES = ["../../secret.jpg", "sub/../../../secret.jpg", "/etc/passwd"]


def test_resolver_accepts_inside_and_refuses_outside(layout):
    root, secret = layout
    assert Path(resolve_in_root(root, "ok.jpg")) == root / "ok.jpg"
    assert Path(resolve_in_root(root, "sub/./x/../ok2.jpg")) == root / "sub" / "ok2.jpg"
    for bad in [*ESCAPES, str(secret), "..", "a\x00b.jpg", ""]:
        with pytest.raises(PathError) as err:
            resolve_in_root(root, bad)
        assert err.value.reason == OUTSIDE_ROOT


def test_coco_both_layouts_report_escapes_and_keep_good_rows(layout):
    root, secret = layout
    names = ["ok.jpg", *ESCAPES, str(secret)]
    captions = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names)],
        "annotations": [{"image_id": i, "caption": f"cap {i}"} for i in range(len(names))],
    }
    ann = root.parent / "captions.json"
    ann.write_text(json.dumps(captions))
    items = list(coco.iter_records(_cfg(annotations=str(ann), images=str(root))))
    recs = [x for x in items if isinstance(x, Record)]
    probs = [x for x in items if isinstance(x, Problem)]
    assert [Path(r.path) for r in recs] == [root / "ok.jpg"]
    assert len(probs) == len(names) - 1 and {p.reason for p in probs} == {OUTSIDE_ROOT}
    assert all(p.row.startswith("images[") for p in probs)

    karpathy = {
        "images": [
            {"filepath": "sub", "filename": "ok2.jpg", "split": "test", "sentences": [{"raw": "a"}]},
            {"filepath": "..", "filename": "../secret.jpg", "split": "test", "sentences": [{"raw": "b"}]},
            {"filename": str(secret), "split": "test", "sentences": [{"raw": "c"}]},
        ]
    }
    ann.write_text(json.dumps(karpathy))
    items = list(coco.iter_records(_cfg(annotations=str(ann), images=str(root))))
    assert [Path(x.path) for x in items if isinstance(x, Record)] == [root / "sub" / "ok2.jpg"]
    assert [x.reason for x in items if isinstance(x, Problem)] == [OUTSIDE_ROOT, OUTSIDE_ROOT]


def test_jsonlist_and_vg_report_escapes(layout, tmp_path):
    root, secret = layout
    ann = tmp_path / "list.json"
    rows = [{"image": "ok.jpg", "caption": "fine"}] + [{"image": e, "caption": "bad"} for e in [*ESCAPES, str(secret)]]
    ann.write_text(json.dumps(rows))
    items = list(jsonlist.iter_records(_cfg(annotations=str(ann), images=str(root))))
    assert [Path(x.path) for x in items if isinstance(x, Record)] == [root / "ok.jpg"]
    assert [x.reason for x in items if isinstance(x, Problem)] == [OUTSIDE_ROOT] * 4

    regions = [
        {"id": "ok", "regions": [{"phrase": "a dog", "x": 1, "y": 1, "width": 3, "height": 3}]},
        {"id": "../../secret", "regions": [{"phrase": "a cat", "x": 1, "y": 1, "width": 3, "height": 3}]},
    ]
    reg = tmp_path / "regions.json"
    reg.write_text(json.dumps(regions))
    items = list(vg.iter_records(_cfg(regions=str(reg), images=str(root))))
    assert [Path(x.path) for x in items if isinstance(x, Record)] == [root / "ok.jpg"]
    assert [x.reason for x in items if isinstance(x, Problem)] == [OUTSIDE_ROOT]


def test_build_counts_outside_root_as_failure_reason(layout, tmp_path):
    from data_prep.build import BuildConfig, run_build
    from launch.config import load_config

    root, secret = layout
    ann = tmp_path / "list.json"
    ann.write_text(json.dumps([{"image": "ok.jpg", "caption": "fine"}, {"image": "../../secret.jpg", "caption": "x"}]))
    out = tmp_path / "out"
    cfg = load_config(
        BuildConfig,
        None,
        [
            "source.format=jsonlist",
            f"source.annotations={ann}",
            f"source.images={root}",
            f"out.dir={out}",
            "out.image_size=16",
            "workers=0",
            "progress=false",
        ],
    )
    run_build(cfg)
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["successes"] == 1 and stats["failures"] == {OUTSIDE_ROOT: 1}


def test_evaluation_images_show_progress_on_rank_0_only(layout, monkeypatch, capsys):
    from finetune.data import ImageStore, eval_image_batches

    root, _ = layout
    refs = ["ok.jpg", "sub/ok2.jpg", "../../secret.jpg"]
    for rank, shown in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        batches = list(eval_image_batches(refs, ImageStore(root), lambda im: __import__("torch").zeros(1), 2))
        assert sum(len(b["index"]) for b in batches) == 2 and sum(len(b["failed"]) for b in batches) == 1
        err = capsys.readouterr().err
        assert ("eval images" in err and "3/3" in err and "img/s" in err) is shown, err


def test_finetune_image_store_refuses_outside_root(layout):
    from finetune.data import ImageError, ImageStore

    root, secret = layout
    store = ImageStore(root)
    assert store.open("sub/ok2.jpg").size == (32, 24)
    for bad in [*ESCAPES, str(secret), "../../secret.tar/x.jpg", "/tmp/x.tar/y.jpg"]:
        with pytest.raises(ImageError, match=OUTSIDE_ROOT):
            store.read_bytes(bad)


# ----------------------------------------------------------------------------------------------- tar member keys
@pytest.mark.parametrize("key", ["../../evil/x", "/abs/x", "a//b", "a/./b", "a\\b", "a.b", "", "x\ny"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(PathError) as err:
        check_member_key(key)
    assert err.value.reason == UNSAFE_KEY


def test_safe_keys_pass():
    for key in ("000010002", "train/00001", "img_a-b"):
        assert check_member_key(key) == key


def test_shard_writer_never_writes_an_unsafe_member(tmp_path):
    with ShardWriter(tmp_path, 0) as w:
        with pytest.raises(PathError):
            w.write("../../evil/x", b"jpg", "cap", {})
        w.write("good", b"jpg", "cap", {})
        w.finish({})
    with tarfile.open(tmp_path / "00000.tar") as tf:
        assert tf.getnames() == ["good.jpg", "good.json", "good.txt"]


def _tar_with_keys(path: Path, keys: list[str]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (90, 120, 30)).save(buf, format="JPEG")
    with tarfile.open(path, "w") as tf:
        for key in keys:
            for ext, data in (("jpg", buf.getvalue()), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return str(path)


def test_style_stage_skips_unsafe_input_keys(tmp_path, monkeypatch):
    from data_prep.style.stage import StageConfig, iter_tar, run
    from launch.config import load_config

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    src = _tar_with_keys(tmp_path / "in" / "00000.tar", ["good", "../../evil/x", "/abs/y"])
    out = tmp_path / "out"
    cfg = load_config(
        StageConfig,
        None,
        [
            f"data.shards={src}",
            f"out.dir={out}",
            "model.embeddings=assets/strad/checkpoint_embeddings.pth",
            "model.random_init=true",
            "model.use_predictor=false",
            "data.num_workers=0",
            "data.batch_size=4",
            "out.tensorboard=false",
            "out.grid_images=0",
            "style.k=1",
        ],
    )
    run(cfg)
    members = [m.name for m in tarfile.open(out / "00000.tar")]
    assert members and all(m.startswith("good") for m in members), members
    assert [k for k, _ in iter_tar(str(out / "00000.tar"))] == ["good", "good_s0"]
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["failures"] == {UNSAFE_KEY: 2}
    assert not (tmp_path / "evil").exists() and not Path("/abs/y.jpg").exists()


# ----------------------------------------------------------------------------------------------- COCO layout
def test_coco_captions_file_without_annotations_is_an_error_naming_both(tmp_path):
    ann = tmp_path / "captions_val2017.json"
    ann.write_text(json.dumps({"info": {}, "images": [{"id": 1, "file_name": "a.jpg"}]}))
    with pytest.raises(ConfigError) as err:
        list(coco.iter_records(_cfg(annotations=str(ann), images=str(tmp_path))))
    msg = str(err.value)
    assert "looks like a COCO captions file" in msg and "no 'annotations'" in msg
    assert "'images'" in msg and "'info'" in msg  # what was found
    assert "Karpathy" in msg and "sentences" in msg  # what was expected


@pytest.mark.parametrize(
    "data, found",
    [
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": {"x": 1}}, "'annotations' is an object"),
        ({"images": [{"foo": 1}]}, "neither layout"),
        ({"annotations": []}, "no 'images' list"),
        ([1, 2], "a JSON list"),
    ],
)
def test_coco_layout_errors_say_what_was_found(tmp_path, data, found):
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="expected a COCO captions file") as err:
        list(coco.iter_records(_cfg(annotations=str(ann), images=str(tmp_path))))
    assert found in str(err.value)
