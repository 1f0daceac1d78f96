"""The shard writer: layout, determinism, resume after interruption, failure accounting, image processing."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from data_prep.images import ImageError, process_image
from data_prep.schema import sample_key
from data_prep.shards import ShardWriter, done_shards, write_manifest, write_shards
from data_prep.sources.base import Problem, Record
from launch.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _jpeg_bytes(size=(64, 48), color=(200, 100, 50)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _records(n: int) -> list[Record | Problem]:
    """A mix of PIL images, encoded bytes, bad bytes and reader problems."""
    out: list[Record | Problem] = []
    for i in range(n):
        if i % 7 == 3:
            out.append(Problem("ann.json", f"row {i}", "empty caption"))
        elif i % 7 == 5:
            out.append(Record(orig_id=str(i), captions=[f"broken {i}"], data=b"not an image at all"))
        elif i % 2:
            out.append(
                Record(orig_id=str(i), captions=[f"pil {i}", "second"], data=Image.new("RGB", (40, 20), (i, 9, 9)))
            )
        else:
            out.append(
                Record(orig_id=str(i), captions=[f"bytes {i}"], data=_jpeg_bytes(color=(i, 50, 50)), extra={"n": i})
            )
    return out


def _write(records, out, workers=0, **kw):
    opts = dict(image_size=16, resize_mode="keep_ratio", samples_per_shard=5, workers=workers, source="test")
    opts.update(kw)
    return write_shards(records, out, build_config={"x": 1}, progress=False, **opts)


def _tree(out: Path) -> dict[str, bytes]:
    """Everything a build leaves that must be reproducible (tars, failure lists)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".tar", ".jsonl")}


def test_shard_writer_layout_and_atomicity(tmp_path):
    with ShardWriter(tmp_path, 3) as w:
        w.write("000030000", b"JPG", "cap", {"captions": ["cap"], "b": 1, "a": 2})
        assert (tmp_path / "00003.tar.tmp").exists() and not (tmp_path / "00003.tar").exists()
        stats = w.finish({"count": 1}, [{"index": 1, "reason": "x"}])
    assert stats["successes"] == 1 and stats["shard"] == 3 and stats["bytes"] == (tmp_path / "00003.tar").stat().st_size
    with tarfile.open(tmp_path / "00003.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["000030000.jpg", "000030000.json", "000030000.txt"]
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(0, 0, 0, 0o444, "")}
        assert json.loads(tar.extractfile(members[1]).read()) == {"a": 2, "b": 1, "captions": ["cap"]}
    assert json.loads((tmp_path / "00003_failures.jsonl").read_text()) == {"index": 1, "reason": "x"}
    assert done_shards(tmp_path) == {3}
    # leaving the block without finish (an error) leaves nothing behind and the shard not done
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, 4) as w:
        w.write("000040000", b"JPG", "cap", {})
        raise RuntimeError("boom")
    assert not list(tmp_path.glob("00004*")) and done_shards(tmp_path) == {3}


def test_positions_keys_failures_and_manifest(tmp_path):
    recs = _records(12)  # items 3 and 10 are reader problems, item 5 undecodable bytes
    summary = _write(recs, tmp_path)
    assert summary.shards_written == 3 and summary.samples == 9 and summary.failed == 3
    assert summary.failures == {"empty caption": 2, "not an image": 1}
    keys = []
    for shard in range(3):
        with tarfile.open(tmp_path / f"{shard:05d}.tar") as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    ok = [i for i in range(12) if i not in (3, 5, 10)]
    assert keys == [sample_key(i // 5, i % 5, 5) for i in ok]  # item i → shard i//5, index i%5; gaps for failures
    fails = [json.loads(x) for s in range(3) for x in (tmp_path / f"{s:05d}_failures.jsonl").read_text().splitlines()]
    assert [(f["index"], f["key"], f["reason"]) for f in fails] == [
        (3, "000000003", "empty caption"),
        (5, "000010000", "not an image"),
        (10, "000020000", "empty caption"),
    ]
    assert fails[0]["row"] == "row 3" and fails[0]["file"] == "ann.json" and fails[1]["id"] == "5"
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [(s["name"], s["samples"], s["failed"]) for s in manifest["shards"]] == [
        ("00000.tar", 4, 1),
        ("00001.tar", 4, 1),
        ("00002.tar", 1, 1),
    ]
    assert manifest["num_samples"] == 9 and manifest["build_config"] == {"x": 1} and manifest["schema_version"] == 1
    assert manifest["failures"] == {"empty caption": 2, "not an image": 1} and manifest["source"] == "test"
    assert write_manifest(tmp_path, "test", {"x": 1}) == manifest
    st = json.loads((tmp_path / "00001_stats.json").read_text())
    assert (st["count"], st["successes"], st["failed"], st["failures"]) == (5, 4, 1, {"not an image": 1})


def test_sample_content_from_pil_and_bytes(tmp_path):
    recs = [
        Record(
            orig_id="a", captions=["first", "second"], data=Image.new("RGB", (100, 50), (255, 0, 0)), extra={"k": 1}
        ),
        Record(orig_id="b", captions=["only"], data=_jpeg_bytes(size=(30, 60))),
    ]
    _write(recs, tmp_path, image_size=20)
    with tarfile.open(tmp_path / "00000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    meta = json.loads(files["000000000.json"])
    assert meta == {
        "captions": ["first", "second"],
        "source": "test",
        "orig_id": "a",
        "width": 40,
        "height": 20,
        "orig_width": 100,
        "orig_height": 50,
        "k": 1,
    }
    assert files["000000000.txt"] == b"first"
    img = Image.open(io.BytesIO(files["000000000.jpg"]))
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (40, 20)  # the PIL image went through resize
    assert Image.open(io.BytesIO(files["000000001.jpg"])).size == (20, 40)


def test_byte_identical_rebuilds(tmp_path):
    _write(_records(12), tmp_path / "a")
    _write(_records(12), tmp_path / "b")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b") and len(_tree(tmp_path / "a")) == 6


def test_resume_rebuilds_only_unfinished_shards(tmp_path):
    clean, out = tmp_path / "clean", tmp_path / "out"
    _write(_records(20), clean)
    _write(_records(20), out)
    # Simulate three kinds of interruption: a killed writer's temp tar; a tar published but stats never
    # written; a shard never started. Shard 0 is finished and must be skipped, not rewritten.
    (out / "00001.tar").rename(out / "00001.tar.tmp")
    (out / "00001_stats.json").unlink()
    (out / "00002.tar").write_bytes(b"half a tar")
    (out / "00002_stats.json").unlink()
    for p in out.glob("00003*"):
        p.unlink()
    mtime0 = (out / "00000.tar").stat().st_mtime_ns
    summary = _write(_records(20), out)
    assert (summary.shards_skipped, summary.shards_written) == (1, 3)
    assert (out / "00000.tar").stat().st_mtime_ns == mtime0
    assert _tree(out) == _tree(clean) and not list(out.glob("*.tmp"))
    assert json.loads((out / "manifest.json").read_text()) == json.loads((clean / "manifest.json").read_text())
    assert summary.total_samples == json.loads((clean / "manifest.json").read_text())["num_samples"]


def test_rerun_with_other_settings_is_refused(tmp_path):
    _write(_records(6), tmp_path)
    with pytest.raises(ConfigError, match="image_size"):
        _write(_records(6), tmp_path, image_size=32)


def test_resize_modes_and_image_checks():
    src = Image.new("RGB", (120, 60), (0, 0, 255))
    keep = process_image(src, 30, "keep_ratio")
    crop = process_image(src, 30, "center_crop")
    pad = process_image(src, 30, "pad")
    assert (keep.width, keep.height) == (60, 30) and (crop.width, crop.height) == (30, 30)
    assert (pad.width, pad.height) == (30, 30) and (pad.orig_width, pad.orig_height) == (120, 60)
    padded = Image.open(io.BytesIO(pad.jpg))
    assert min(padded.getpixel((15, 1))) > 240 and padded.getpixel((15, 15))[2] > 200  # white border, blue inside
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert min(Image.open(io.BytesIO(process_image(buf.getvalue(), 20).jpg)).getpixel((5, 5))) > 240  # not black
    with pytest.raises(ImageError) as info:
        process_image(_jpeg_bytes(size=(200, 200)), 16, max_pixels=10_000)
    assert info.value.reason == "decompression bomb"
    with pytest.raises(ImageError) as info:
        process_image(Image.new("RGB", (400, 2)), 64, max_pixels=10_000)  # 12800x64 after keep_ratio
    assert info.value.reason == "extreme aspect ratio"
    with pytest.raises(ImageError) as info:
        process_image(b"GIF89a garbage", 16)
    assert info.value.reason == "not an image"
    # EXIF orientation 6 (stored sideways): upright original is 30x60 and is rotated before resizing
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (60, 30), (9, 9, 9)).save(buf, format="JPEG", exif=exif)
    rot = process_image(buf.getvalue(), 15)
    assert (rot.orig_width, rot.orig_height, rot.width, rot.height) == (30, 60, 15, 30)


@pytest.mark.slow
def test_worker_processes_equal_in_process(tmp_path):
    _write(_records(23), tmp_path / "a", workers=0)
    summary = _write(_records(23), tmp_path / "b", workers=2)
    assert summary.shards_written == 5 and not summary.errors
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


@pytest.mark.slow
def test_sigkill_mid_build_then_rerun_equals_clean_build(tmp_path):
    imgs = tmp_path / "img"
    imgs.mkdir()
    for i in range(4):
        noise = Image.effect_noise((480, 360), 40 + 10 * i).convert("RGB")
        noise.save(imgs / f"{i}.jpg", quality=90)
    rows = [{"image": f"{i % 4}.jpg", "caption": f"noise picture {i}"} for i in range(240)]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(rows))
    args = [
        "source.format=jsonlist",
        f"source.annotations={ann}",
        f"source.images={imgs}",
        "out.image_size=200",
        "out.samples_per_shard=20",
        "workers=0",
        "progress=false",
    ]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", "build", *args, f"out.dir={out}"], cwd=ROOT, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("*_stats.json")) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    n_done = len(done_shards(out))
    assert 1 <= n_done < 12 and not (out / "manifest.json").exists()
    rerun = subprocess.run(
        [sys.executable, "-m", "data_prep", "build", *args, f"out.dir={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert f"{12 - n_done} written, {n_done} already done" in rerun.stdout
    clean = tmp_path / "clean"
    subprocess.run(
        [sys.executable, "-m", "data_prep", "build", *args, f"out.dir={clean}"],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert _tree(out) == _tree(clean) and len(_tree(clean)) == 24


def test_multi_task_build_splits_shards_and_last_task_writes_manifest(tmp_path):
    """An array job: task r of W builds shards r, r+W, ...; together they equal a one-task build."""
    clean, split = tmp_path / "clean", tmp_path / "split"
    _write(_records(23), clean)
    first = _write(_records(23), split, rank=1, world_size=2)
    assert sorted(done_shards(split)) == [1, 3]
    assert first.shards_other_ranks == 3 and first.manifest_pending == 3
    assert not (split / "manifest.json").exists()
    second = _write(_records(23), split, rank=0, world_size=2)
    assert sorted(done_shards(split)) == [0, 1, 2, 3, 4]
    assert second.manifest_pending == 0 and (split / "manifest.json").exists()
    assert _tree(split) == _tree(clean)
    manifest = json.loads((split / "manifest.json").read_text())
    assert manifest["num_samples"] == json.loads((clean / "manifest.json").read_text())["num_samples"]
    with pytest.raises(ConfigError, match="outside world size"):
        _write(_records(3), tmp_path / "bad", rank=2, world_size=2)


def test_tar_bytes_equal_what_tarfile_writes(tmp_path):
    """The writer's own ustar headers and end-of-archive padding are byte for byte tarfile's."""
    members = [
        ("000000000.jpg", b"\xff\xd8" + bytes(range(256)) * 7),
        ("000000000.json", b"{}"),
        ("000000000.txt", b""),
    ]
    members += [("000000001.jpg", b"x" * 512), ("k" * 96 + ".txt", "é".encode()), ("000000002.txt", b"y" * 10_000)]
    with ShardWriter(tmp_path, 0) as w:
        for name, data in members:
            w._add(name, data)
        w.finish()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0,
                0o444,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "00000.tar").read_bytes() == buf.getvalue()
    long_name = "d" * 120 + "/x.txt"  # beyond the 100-byte name field: tarfile's prefix split
    from data_prep.shards import ustar_header

    info = tarfile.TarInfo(long_name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 3, 0, 0o444, 0, 0, "", ""
    assert ustar_header(long_name, 3) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
