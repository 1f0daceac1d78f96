"""``python -m data_prep inspect``: counts, caption-length histogram, failures from stats, contact sheet."""

from __future__ import annotations

import io
import json
import tarfile

from PIL import Image

from data_prep import __main__ as cli
from data_prep.inspect import inspect_shards, length_bin, resolve_shards
from data_prep.shards import write_shards
from data_prep.sources.base import Problem, Record


def _build(out):
    recs = [
        Record(orig_id="0", captions=["one two three", "a b c d e f"], data=Image.new("RGB", (30, 20), (250, 0, 0))),
        Problem("ann.json", "row 1", "empty caption"),
        Record(orig_id="2", captions=[" ".join(["w"] * 12)], data=Image.new("RGB", (20, 20), (0, 250, 0))),
        Record(orig_id="3", captions=["x"], data=b"corrupt"),
        Record(orig_id="4", captions=[" ".join(["w"] * 55)], data=Image.new("RGB", (20, 40), (0, 0, 250))),
    ]
    write_shards(
        recs, out, image_size=16, resize_mode="keep_ratio", samples_per_shard=3, workers=0, source="t",
        build_config={}, progress=False,
    )  # fmt: skip


def test_length_bins():
    assert [length_bin(n) for n in (0, 4, 5, 14, 29, 30, 49, 50, 400)] == [
        "0-4", "0-4", "5-9", "10-14", "20-29", "30-49", "30-49", "50+", "50+",
    ]  # fmt: skip


def test_inspect_report_and_contact_sheet(tmp_path, capsys):
    out = tmp_path / "shards"
    _build(out)
    report = inspect_shards(resolve_shards(str(out)), sheet_samples=2)
    assert report["shards"] == 2 and report["samples"] == 3 and report["captions"] == 4
    assert dict(report["caption_words"]) == {"0-4": 1, "5-9": 1, "10-14": 1, "50+": 1}
    assert dict(report["captions_per_sample"]) == {2: 1, 1: 2}
    assert dict(report["failures"]) == {"empty caption": 1, "not an image": 1} and report["failed"] == 2
    assert dict(report["image_sizes"]) == {"24x16": 1, "16x16": 1, "16x32": 1}
    assert [k for _, k, _ in report["sheet"]] == ["000000000", "000000002"]
    assert report["shards_without_stats"] == [] and report["unfinished_temp_files"] == []

    sheet = tmp_path / "sheet.png"
    assert cli.main(["inspect", str(out / "{00000..00001}.tar"), "--out", str(sheet), "--num", "3"]) == 0
    text = capsys.readouterr().out
    assert "samples: 3" in text and "not an image" in text and "contact sheet" in text
    img = Image.open(sheet)
    assert img.format == "PNG" and img.width > 3 * 160 and img.height > 160
    assert img.getpixel((6 + 80, 6 + 80))[0] > 200  # the first tile shows the red sample


def test_inspect_flags_unfinished_and_plain_img2dataset(tmp_path, capsys):
    out = tmp_path / "shards"
    _build(out)
    (out / "00001_stats.json").unlink()
    (out / "00005.tar.tmp").write_bytes(b"partial")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    with tarfile.open(out / "00007.tar", "w") as tar:  # an img2dataset-style shard: caption only in .txt
        for name, data in (
            ("000070000.jpg", buf.getvalue()),
            ("000070000.txt", b"plain caption"),
            ("000070000.json", json.dumps({"url": "http://x"}).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (out / "00009.tar").write_bytes(b"garbage" * 100)
    report = inspect_shards(resolve_shards(str(out)))
    assert report["samples"] == 4 and report["captions"] == 5
    assert [p.rsplit("/", 1)[1] for p in report["shards_without_stats"]] == ["00001.tar", "00007.tar", "00009.tar"]
    assert report["unfinished_temp_files"][0].endswith("00005.tar.tmp") and len(report["unreadable_shards"]) == 1
    assert cli.main(["inspect", str(out), "--json"]) == 1  # an unreadable shard makes the exit status non-zero
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == 4 and printed["failures"] == {"empty caption": 1}


def test_cli_dispatch(tmp_path, capsys, monkeypatch):
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["bogus"]) == 2
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda argv: calls.append(argv) or 0)
    assert cli.main(["train-style", "train.max_steps=3"]) == 0
    assert calls[0][1:] == ["-m", "pretrain", "--config", "configs/pretrain/style.yaml", "train.max_steps=3"]
    assert cli.main(["train-style", "--config", "x.yaml"]) == 0 and calls[1][3:] == ["--config", "x.yaml"]
    assert cli.main(["build", "source.format=cc3m", f"out.dir={tmp_path}"]) == 2
    assert "source.tsv: required" in capsys.readouterr().err


def test_data_prep_never_imports_pretrain():
    import subprocess
    import sys

    code = (
        "import sys, data_prep.__main__, data_prep.build, data_prep.shards, data_prep.inspect, data_prep.download\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pretrain', 'finetune', 'torch'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
