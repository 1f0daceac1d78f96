"""ShardLoader: Batch contract, rank balance, corrupt samples, img2dataset shards and exact resume."""

from __future__ import annotations

import io
import itertools
import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from data_prep.schema import sample_key
from data_prep.tar_reader import TarDamaged, count_tar_samples, iter_tar_samples
from data_prep.transforms import pre_caption
from pretrain.config import DataConfig
from pretrain.data import ShardLoader, shard_sample_counts


def _jpeg(seed: int) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    w, h = (int(v) for v in torch.randint(32, 49, (2,), generator=gen))
    pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def make_shards(
    root: Path,
    sizes: list[int],
    *,
    corrupt: dict[str, str] | None = None,
    style: str = "ours",
    counts_from: str = "manifest",
) -> dict[str, list[str]]:
    """Write ``{shard:05d}.tar`` shards; returns key -> captions of every good sample.

    corrupt maps a key to one of bad_jpeg / empty_caption / bad_json / no_image. style "img2dataset" writes json
    without captions (the caption only in .txt). counts_from: manifest | stats (img2dataset-style) | none.
    """
    corrupt = corrupt or {}
    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, list[str]] = {}
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as tw:
            for i in range(n):
                key = sample_key(s, i, 100)
                caps = [f"A Photo, number {s}-{i}!", f"another view of {key}", f"third (caption) {i}"]
                meta: dict = {"captions": caps, "source": "test", "orig_id": key}
                if style == "img2dataset":
                    meta = {"url": f"http://example.invalid/{key}.jpg", "key": key, "status": "success"}
                sample = {"__key__": key, "jpg": _jpeg(s * 1000 + i), "txt": caps[0], "json": json.dumps(meta)}
                kind = corrupt.get(key)
                if kind == "bad_jpeg":
                    sample["jpg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
                elif kind == "empty_caption":
                    sample["txt"] = "   "
                    sample["json"] = json.dumps({**meta, "captions": ["", " "]})
                elif kind == "bad_json":
                    sample["json"] = "{not json"
                elif kind == "no_image":
                    del sample["jpg"]
                tw.write(sample)
                if kind is None:
                    good[key] = caps if style == "ours" else caps[:1]
        if counts_from == "stats":  # img2dataset: count = attempted, successes = written
            (root / f"{s:05d}_stats.json").write_text(json.dumps({"count": n + 3, "successes": n}))
    if counts_from == "manifest":
        shards = [{"name": f"{s:05d}.tar", "samples": n} for s, n in enumerate(sizes)]
        (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "shards": shards}))
    return good


def cfg_for(root: Path, **kw) -> DataConfig:
    base = dict(shards=str(root / "*.tar"), batch_size=4, num_workers=0, image_size=24, shuffle_buffer=6)
    base.update(kw)
    return DataConfig(**base)


def take(loader: ShardLoader, n: int) -> list[dict]:
    it = iter(loader)
    out = list(itertools.islice(it, n))
    it.close()
    return out


def test_batch_contract(tmp_path):
    good = make_shards(tmp_path, [6, 5])
    loader = ShardLoader(cfg_for(tmp_path, views=2), seed=0, rank=0, world_size=1)
    batches = take(loader, 3)
    for b in batches:
        assert set(b) == {"image", "image2", "text", "key", "caption_idx"}
        assert b["image"].shape == (4, 3, 24, 24) and b["image"].dtype == torch.float32
        assert b["image2"].shape == b["image"].shape and not torch.equal(b["image"], b["image2"])
        assert type(b["text"]) is list and all(isinstance(t, str) for t in b["text"])
        assert type(b["key"]) is list and type(b["caption_idx"]) is list
        for key, text, idx in zip(b["key"], b["text"], b["caption_idx"]):
            assert text == pre_caption(good[key][idx])
        # normalized: pixel values in [0,1] map into [(0-mean)/std, (1-mean)/std]
        assert b["image"].min() >= -1.8 and b["image"].max() <= 2.2
    # the caption choice is drawn per visit: over 12 samples, more than one caption index is used
    assert len({i for b in batches for i in b["caption_idx"]}) > 1


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_ranks_balanced_disjoint_and_cover_the_epoch(tmp_path, num_workers):
    sizes = [7, 12, 9, 4, 11]  # 43 samples, uneven shards
    good = make_shards(tmp_path, sizes)
    cfg = cfg_for(tmp_path, num_workers=num_workers)
    loaders = [ShardLoader(cfg, seed=3, rank=r, world_size=2) for r in range(2)]
    steps = loaders[0].steps_per_epoch
    assert steps == loaders[1].steps_per_epoch
    workers = max(1, num_workers)
    per_worker = -(-43 // (2 * workers * 4))
    assert steps == per_worker * workers
    padded = 2 * steps * 4
    epochs = [take(ld, 2 * steps) for ld in loaders]  # two epochs per rank
    for e in range(2):
        seen = [Counter(k for b in batches[e * steps : (e + 1) * steps] for k in b["key"]) for batches in epochs]
        total = seen[0] + seen[1]
        assert set(total) == set(good)  # every sample of the epoch is seen
        assert sum(total.values()) == padded  # all batches full
        assert sum(c - 1 for c in total.values()) == padded - 43  # repeats are exactly the wrap-around padding
        assert sum((seen[0] & seen[1]).values()) <= padded - 43  # ranks only share padded samples
    for batches in epochs:  # each epoch reshuffles
        first = [k for b in batches[:steps] for k in b["key"]]
        second = [k for b in batches[steps:] for k in b["key"]]
        assert first != second


def test_same_seed_same_batches_other_seed_differs(tmp_path):
    make_shards(tmp_path, [8, 8, 8])
    a = take(ShardLoader(cfg_for(tmp_path), seed=1), 2)
    b = take(ShardLoader(cfg_for(tmp_path), seed=1), 2)
    c = take(ShardLoader(cfg_for(tmp_path), seed=2), 2)
    assert [x["key"] for x in a] == [x["key"] for x in b]
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert [x["key"] for x in a] != [x["key"] for x in c]


def test_too_few_shards_is_a_clear_error(tmp_path):
    make_shards(tmp_path, [5, 5, 5])
    cfg = cfg_for(tmp_path, num_workers=2)
    with pytest.raises(ValueError) as err:
        ShardLoader(cfg, seed=0, rank=0, world_size=2)
    msg = str(err.value)
    assert "3 shard" in msg and "= 4" in msg and str(tmp_path) in msg
    ShardLoader(cfg, seed=0, rank=0, world_size=1)  # 3 >= 1 x 2: fine


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    bad = {
        sample_key(0, 2, 100): "bad_jpeg",
        sample_key(1, 0, 100): "empty_caption",
        sample_key(1, 4, 100): "bad_json",
        sample_key(2, 3, 100): "no_image",
    }
    good = make_shards(tmp_path, [6, 6, 6, 6], corrupt=bad)
    loader = ShardLoader(cfg_for(tmp_path), seed=0)
    with caplog.at_level(logging.WARNING, logger="vlp.data"):
        batches = take(loader, loader.steps_per_epoch)
    keys = Counter(k for b in batches for k in b["key"])
    assert all(b["image"].shape[0] == 4 for b in batches)  # the slot is topped up: batches stay full
    assert set(keys) == set(good)  # every good sample seen, no bad one
    assert loader.skipped >= 4
    assert sum(loader.skip_reasons.values()) == loader.skipped
    assert {"undecodable image", "missing or empty caption", "bad json", "missing image"} <= set(loader.skip_reasons)
    logged = " ".join(r.getMessage() for r in caplog.records)
    for key in bad:
        assert key in logged


@pytest.mark.slow
def test_worker_skip_counts_stale_manifest_and_truncated_tar(tmp_path):
    bad = {sample_key(0, 1, 100): "bad_jpeg", sample_key(3, 2, 100): "bad_jpeg"}
    good = make_shards(tmp_path, [5, 5, 5, 5, 5], corrupt=bad)
    # a stale manifest that promises two samples more than shard 1 holds
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["samples"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    # shard 4 cut in the middle of a member: the samples before the cut survive
    tar4 = tmp_path / "00004.tar"
    tar4.write_bytes(tar4.read_bytes()[: tar4.stat().st_size * 3 // 5])
    loader = ShardLoader(cfg_for(tmp_path, num_workers=2), seed=0)
    batches = take(loader, loader.steps_per_epoch)
    keys = {k for b in batches for k in b["key"]}
    lost = {k for k in good if k.startswith("00004")} - keys
    assert 1 <= len(lost) < 5 and keys == set(good) - lost
    assert all(len(b["key"]) == 4 for b in batches)
    assert loader.skip_reasons["undecodable image"] >= 2
    assert loader.skip_reasons["missing from shard"] >= 2  # the two samples the manifest promised
    assert loader.skip_reasons["tar read error"] >= 1


@pytest.mark.parametrize("counts_from", ["stats", "none"])
def test_img2dataset_shards(tmp_path, counts_from):
    good = make_shards(tmp_path, [5, 7], style="img2dataset", counts_from=counts_from)
    assert shard_sample_counts(sorted(str(p) for p in tmp_path.glob("*.tar"))) == [5, 7]
    assert count_tar_samples(str(tmp_path / "00001.tar")) == (7, None)
    loader = ShardLoader(cfg_for(tmp_path), seed=0)
    assert loader.num_samples == 12 and loader.steps_per_epoch == 3
    batches = take(loader, 3)
    for b in batches:
        for key, text, idx in zip(b["key"], b["text"], b["caption_idx"]):
            assert idx == 0 and text == pre_caption(good[key][0])
    assert {k for b in batches for k in b["key"]} == set(good)


def test_truncated_shard_without_counts_keeps_its_readable_samples(tmp_path, caplog):
    """No manifest or stats: a tar cut in half still trains on the samples before the cut, and says so."""
    make_shards(tmp_path, [12, 12], counts_from="none")
    cut = tmp_path / "00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    readable: list[str] = []
    with pytest.raises(TarDamaged):
        for key, _ in iter_tar_samples(str(cut)):
            readable.append(key)
    assert 3 <= len(readable) < 12
    first = [key for key, _ in iter_tar_samples(str(tmp_path / "00000.tar"))]
    with caplog.at_level(logging.WARNING, logger="vlp.data"):
        loader = ShardLoader(cfg_for(tmp_path), seed=0, train=False)
    assert loader.num_samples == len(first) + len(readable)
    assert f"00001.tar: damaged after {len(readable)} complete samples" in caplog.text
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(first + readable)


def _assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"] and x["text"] == y["text"] and x["caption_idx"] == y["caption_idx"]
        assert torch.equal(x["image"], y["image"])
        if "image2" in x:
            assert torch.equal(x["image2"], y["image2"])


@pytest.mark.parametrize(
    "num_workers,stop", [(0, 5), *(pytest.param(2, stop, marks=pytest.mark.slow) for stop in (7, 12, 15))]
)
def test_exact_resume_across_an_epoch_boundary(tmp_path, num_workers, stop):
    bad = {sample_key(0, 3, 100): "bad_jpeg", sample_key(2, 1, 100): "empty_caption"}
    make_shards(tmp_path, [9, 11, 7, 10, 8], corrupt=bad)  # 45 positions
    cfg = cfg_for(tmp_path, num_workers=num_workers, views=2)
    ref_loader = ShardLoader(cfg, seed=11)
    steps = ref_loader.steps_per_epoch
    total = steps + 6  # crosses into the second epoch
    assert steps == 12 and stop < total  # 12 = the epoch boundary, 15 = inside the second epoch
    reference = take(ref_loader, total)

    first = ShardLoader(cfg, seed=11)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()  # workers have prefetched more than `stop`: the state must not count those
    it.close()
    assert (state["epoch"], state["step"]) == divmod(stop, steps)
    assert json.loads(json.dumps(state)) == state  # plain data, storable in any checkpoint
    _assert_same(head, reference[:stop])

    resumed = ShardLoader(cfg, seed=11)
    resumed.load_state_dict(state)
    tail = take(resumed, total - stop)
    _assert_same(tail, reference[stop:])
    assert resumed.epoch == 1 and resumed.step == total - steps
    assert resumed.state_dict() == ref_loader.state_dict()
    assert resumed.skipped == ref_loader.skipped


@pytest.mark.slow
def test_resume_without_cursors_replays_exactly(tmp_path):
    # a state saved by another rank (or by a checkpoint that kept only rank 0's) carries no usable cursors
    bad = {sample_key(0, 0, 100): "bad_jpeg", sample_key(1, 2, 100): "bad_jpeg", sample_key(2, 4, 100): "bad_json"}
    make_shards(tmp_path, [6, 6, 6, 6], corrupt=bad)
    cfg = cfg_for(tmp_path, num_workers=2)
    reference = take(ShardLoader(cfg, seed=5, rank=1, world_size=2), 5)
    other = ShardLoader(cfg, seed=5, rank=0, world_size=2)
    take(other, 3)
    state = other.state_dict()
    assert state["rank"] == 0
    resumed = ShardLoader(cfg, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(state)
    _assert_same(take(resumed, 2), reference[3:])


def test_state_from_a_different_setup_is_refused(tmp_path):
    make_shards(tmp_path, [6, 6, 6, 6])
    loader = ShardLoader(cfg_for(tmp_path), seed=0)
    take(loader, 2)
    state = loader.state_dict()
    other = ShardLoader(cfg_for(tmp_path, batch_size=3), seed=0)
    with pytest.raises(ValueError, match="batch_size: saved 4 now 3"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="outside an epoch"):
        loader.load_state_dict({**state, "step": loader.steps_per_epoch})
    other.load_state_dict(state, strict=False)  # approximate: same epoch fraction
    assert other.epoch == 0 and other.step == 2 * other.steps_per_epoch // loader.steps_per_epoch
    assert len(take(other, 1)[0]["key"]) == 3


def test_iter_continues_and_epochs_roll_over(tmp_path):
    make_shards(tmp_path, [4, 4])
    loader = ShardLoader(cfg_for(tmp_path), seed=0)
    assert loader.steps_per_epoch == 2
    a = take(loader, 3)
    b = take(loader, 2)  # a second iter() continues, it does not restart
    reference = take(ShardLoader(cfg_for(tmp_path), seed=0), 5)
    _assert_same(a + b, reference)
    assert loader.epoch == 2 and loader.step == 1


def test_eval_pass_is_ordered_complete_and_deterministic(tmp_path):
    good = make_shards(tmp_path, [5, 6])
    loader = ShardLoader(cfg_for(tmp_path), seed=0, train=False)
    first = list(loader)
    second = list(loader)
    keys = [k for b in first for k in b["key"]]
    assert keys == sorted(good) and len(first) == loader.steps_per_epoch == 3
    assert [len(b["key"]) for b in first] == [4, 4, 3]
    assert all(i == 0 for b in first for i in b["caption_idx"])
    _assert_same(first, second)
