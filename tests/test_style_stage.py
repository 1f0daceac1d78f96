"""The sharded style stage end to end on tiny shards: layout, metadata, modes, resume, corrupt input, ranks."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.shards import ShardWriter
from data_prep.style.sampling import sample_seed
from data_prep.style.stage import StageConfig, main, run
from data_prep.tar_reader import iter_tar_samples
from launch.config import ConfigError, load_config

N_PER_SHARD = 4
SIZE = (46, 58)  # H, W: not multiples of 4 (padded and cropped back), >= 43 for the predictor


def _jpeg(rng: np.random.Generator, h: int = SIZE[0], w: int = SIZE[1]) -> bytes:
    arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path, n_shards: int = 3, corrupt: bool = False) -> str:
    rng = np.random.default_rng(0)
    for sh in range(n_shards):
        with ShardWriter(root, sh) as w:
            for i in range(N_PER_SHARD):
                key = f"{sh:05d}{i:04d}"
                jpg = _jpeg(rng)
                if corrupt and sh == 1 and i == 1:
                    jpg = b"\xff\xd8 definitely not a jpeg"
                meta = {"captions": [f"a photo {key}", "second caption"], "source": "unit", "orig_id": key}
                meta.update(width=SIZE[1], height=SIZE[0], boxes=[[1, 2, 3, 4]])
                w.write(key, jpg, f"a photo {key}", meta)
            w.finish({})
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A legacy-format embeddings file with the public keys (synthetic values; the real file is tested elsewhere)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(100, 100, generator=g, dtype=torch.float64) * 0.05
    path = tmp_path_factory.mktemp("emb") / "checkpoint_embeddings.pth"
    stats = {
        "pbn_embedding_mean": torch.randn(100, generator=g),
        "pbn_embedding_covariance": a @ a.T + 1e-4 * torch.eye(100, dtype=torch.float64),
        "imagenet_embedding_mean": torch.randn(100, generator=g, dtype=torch.float64),
    }
    torch.save(stats, path, _use_new_zipfile_serialization=False)
    return str(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_shards(tmp_path_factory.mktemp("in"))


def cfg_for(shards: str, out: Path, embeddings: str, *extra: str) -> StageConfig:
    overrides = [
        f"data.shards={shards}",
        f"out.dir={out}",
        f"model.embeddings={embeddings}",
        "model.random_init=true",
        "model.use_predictor=false",
        "data.num_workers=0",
        "data.batch_size=4",
        "out.grid_images=2",
        "out.grid_styles=2",
        "out.tensorboard=false",
        *extra,
    ]
    return load_config(StageConfig, None, overrides)


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    return list(iter_tar_samples(str(path)))


def decode(jpg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"), dtype=np.float32)


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(autouse=True)
def single_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------------------------
def test_copies_mode_layout_metadata_and_draws(tmp_path: Path, shards: str, embeddings: str) -> None:
    out = tmp_path / "out"
    summary = run(cfg_for(shards, out, embeddings, "style.k=2", "style.alpha=0.3", "style.seed=7"))
    assert summary["shards"] == 3 and summary["stylized"] == 3 * N_PER_SHARD * 2
    names = sorted(os.listdir(out))
    for sh in range(3):
        assert f"{sh:05d}.tar" in names and f"{sh:05d}_stats.json" in names
    assert "manifest.json" in names and "style_grid.png" in names
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 3 * N_PER_SHARD * 3 and manifest["num_shards"] == 3
    assert "random_init" in manifest["build_config"]["model"]["kind"]  # the demo weights are labelled

    samples = read_shard(out / "00001.tar")
    keys = [k for k, _ in samples]
    assert keys[:3] == ["000010000", "000010000_s0", "000010000_s1"] and len(keys) == N_PER_SHARD * 3
    src = {k: parts for k, parts in read_shard(Path(shards.split("{")[0]) / "00001.tar")}
    for key, parts in samples:
        meta = json.loads(parts["json"])
        st = meta["style"]
        orig = src[st["source_key"]]
        orig_meta = json.loads(orig["json"])
        assert meta["captions"] == orig_meta["captions"] and meta["boxes"] == [[1, 2, 3, 4]]
        assert parts["txt"] == orig["txt"]
        if not st["stylized"]:
            assert parts["jpg"] == orig["jpg"]  # originals pass through byte for byte
            continue
        assert st["alpha"] == 0.3 and st["seed"] == 7 and key.endswith(f"_s{st['draw']}")
        assert st["draw_seed"] == sample_seed(7, st["source_key"], st["draw"])
        styl, base = decode(parts["jpg"]), decode(orig["jpg"])
        assert styl.shape == base.shape == (*SIZE, 3)
        assert np.abs(styl - base).mean() > 10  # actually restyled
    s0, s1 = (decode(samples[i][1]["jpg"]) for i in (1, 2))
    assert np.abs(s0 - s1).mean() > 2  # two draws of the same image differ
    grid = Image.open(out / "style_grid.png")
    assert grid.size == (3 * SIZE[1] + 4 * 2, 2 * SIZE[0] + 3 * 2)  # 2 rows x (original + 2 styles), 2px padding


@pytest.mark.parametrize("ratio,expect", [("2:1", 2), ("1:2", 8), ("4:1", 1)])
def test_ratio_mode_counts(tmp_path: Path, shards: str, embeddings: str, ratio: str, expect: int) -> None:
    out = tmp_path / "out"
    summary = run(cfg_for(shards, out, embeddings, "style.mode=ratio", f"style.ratio={ratio}"))
    for sh in range(3):
        stats = json.loads((out / f"{sh:05d}_stats.json").read_text())
        assert stats["originals"] == N_PER_SHARD and stats["stylized"] == expect
        styl = [k for k, p in read_shard(out / f"{sh:05d}.tar") if json.loads(p["json"])["style"]["stylized"]]
        assert len(styl) == expect
    assert summary["stylized"] == 3 * expect


def test_resume_redoes_only_missing_shard_byte_identical(tmp_path: Path, shards: str, embeddings: str) -> None:
    out = tmp_path / "out"
    run(cfg_for(shards, out, embeddings, "style.k=1"))
    before = tar_bytes(out)
    stats0 = (out / "00000_stats.json").read_bytes()
    (out / "00001_stats.json").unlink()  # as if killed before shard 1's done-marker
    (out / "00001.tar").write_bytes(b"half a tar")
    summary = run(cfg_for(shards, out, embeddings, "style.k=1", "data.num_workers=2"))
    assert summary["shards"] == 1 and summary["skipped"] == 2
    assert (out / "00000_stats.json").read_bytes() == stats0  # untouched
    assert tar_bytes(out) == before  # redone shard identical, also with worker processes decoding
    with pytest.raises(ConfigError, match="different settings.*alpha"):
        run(cfg_for(shards, out, embeddings, "style.k=1", "style.alpha=0.9"))


@pytest.mark.parametrize("on_error", ["passthrough", "skip"])
def test_corrupt_sample_reported_and_handled(tmp_path: Path, embeddings: str, on_error: str) -> None:
    pattern = make_shards(tmp_path / "in", n_shards=2, corrupt=True)
    out = tmp_path / "out"
    summary = run(cfg_for(pattern, out, embeddings, "style.k=1", f"style.on_error={on_error}"))
    assert summary["shards"] == 2
    stats = json.loads((out / "00001_stats.json").read_text())
    assert stats["failed"] == 1 and stats["failures"] == {"not an image": 1}
    failures = [json.loads(x) for x in (out / "00001_failures.jsonl").read_text().splitlines()]
    assert failures[0]["key"] == "000010001" and failures[0]["reason"] == "not an image"
    samples = dict(read_shard(out / "00001.tar"))
    if on_error == "passthrough":
        assert samples["000010001"]["jpg"] == b"\xff\xd8 definitely not a jpeg"
        assert json.loads(samples["000010001"]["json"])["style"]["error"].startswith("not an image")
        assert "000010001_s0" not in samples and len(samples) == 2 * N_PER_SHARD - 1
    else:
        assert "000010001" not in samples and len(samples) == 2 * (N_PER_SHARD - 1)
    assert len(read_shard(out / "00000.tar")) == 2 * N_PER_SHARD  # the other shard is unaffected


def test_truncated_tar_is_reported_not_fatal(tmp_path: Path, embeddings: str) -> None:
    pattern = make_shards(tmp_path / "in", n_shards=2)
    data = (tmp_path / "in" / "00001.tar").read_bytes()
    (tmp_path / "in" / "00001.tar").write_bytes(data[: len(data) // 2 + 100])
    out = tmp_path / "out"
    summary = run(cfg_for(pattern, out, embeddings, "style.k=1"))
    assert summary["shards"] == 2
    stats = json.loads((out / "00001_stats.json").read_text())
    assert stats["failures"].get("unreadable tar") == 1 and stats["count"] < N_PER_SHARD


def test_two_ranks_cover_all_shards_disjointly(
    tmp_path: Path, shards: str, embeddings: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    seen: dict[int, set[str]] = {}
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        before = set(os.listdir(out)) if out.exists() else set()
        summary = run(cfg_for(shards, out, embeddings, "style.k=1"))
        seen[rank] = {n for n in set(os.listdir(out)) - before if n.endswith(".tar")}
        assert summary.get("manifest", False) == (rank == 0)  # the last rank to finish writes the manifest
    assert seen == {0: {"00000.tar", "00002.tar"}, 1: {"00001.tar"}}
    assert json.loads((out / "manifest.json").read_text())["num_shards"] == 3


def test_predictor_path_and_cli(tmp_path: Path, shards: str, embeddings: str) -> None:
    """The CLI with the real config file, the style predictor on (images >= 43 px), and a bad key -> exit 2."""
    out = tmp_path / "out"
    args = ["--config", "configs/style/stage.yaml", f"data.shards={shards}", f"out.dir={out}"]
    args += [f"model.embeddings={embeddings}", "data.num_workers=0", "runtime.encode_threads=1", "style.k=2"]
    args += ["model.checkpoint=null", "model.random_init=true"]  # the recipe's default is the trained network
    repo = Path(__file__).resolve().parents[1]
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        assert main(args) == 0
        assert main([*args, "style.kk=1"]) == 2
    finally:
        os.chdir(cwd)
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["settings"]["use_predictor"] is True and stats["stylized"] == 2 * N_PER_SHARD
    assert (out / "tensorboard").is_dir() and (out / "style_grid.png").is_file()


def test_config_errors(tmp_path: Path, shards: str, embeddings: str) -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        cfg_for(shards, tmp_path, embeddings, "model.checkpoint=" + embeddings)
    with pytest.raises(ConfigError, match="style.ratio"):
        cfg_for(shards, tmp_path, embeddings, "style.mode=ratio", "style.ratio=3")
    with pytest.raises(ConfigError, match="no shard files"):
        cfg_for(str(tmp_path / "nothing_{00000..00001}.tar"), tmp_path, embeddings)


def public_transformer_file(path: Path) -> None:
    """A legacy-format file laid out like checkpoint_transformer.pth (reference key names, random weights)."""
    g = torch.Generator().manual_seed(3)
    sd: dict[str, torch.Tensor] = {}
    specs = [(0, 3, 32, 9), (1, 32, 64, 3), (2, 64, 128, 3), *[(i, 128, 128, 3) for i in range(3, 8)]]
    specs += [(8, 128, 64, 3), (9, 64, 32, 3), (10, 32, 3, 9)]
    for i, ci, co, k in specs:
        convs = ["conv1", "conv2"] if 3 <= i <= 7 else ["conv"]
        fcs = [f"fc_{gb}{n}" for n in (1, 2) for gb in ("gamma", "beta")] if 3 <= i <= 7 else []
        fcs = fcs or ([f"fc_{gb}" for gb in ("gamma", "beta")] if i >= 8 else [])
        for c in convs:
            sd[f"layers.{i}.{c}.weight"] = torch.randn(co, ci, k, k, generator=g) * 0.05
            sd[f"layers.{i}.{c}.bias"] = torch.randn(co, generator=g) * 0.05
        for f in fcs:
            sd[f"layers.{i}.{f}.weight"] = torch.randn(co, 100, generator=g) * 0.1
            sd[f"layers.{i}.{f}.bias"] = torch.randn(co, generator=g) * 0.1 + (1.0 if "gamma" in f else 0.0)
    torch.save({"state_dict_ghiasi": sd}, path, _use_new_zipfile_serialization=False)


def test_public_weights_and_exported_checkpoint_agree(tmp_path: Path, shards: str, embeddings: str) -> None:
    from data_prep.style.strad import export_style_checkpoint

    pub = tmp_path / "checkpoint_transformer.pth"
    public_transformer_file(pub)
    common = ["model.random_init=false", "model.use_predictor=false", "style.k=1"]
    run(cfg_for(shards, tmp_path / "a", embeddings, *common, f"model.transformer={pub}"))
    ck = tmp_path / "style.safetensors"
    export_style_checkpoint(ck, pub, embeddings)
    over = [*common, f"model.checkpoint={ck}", "model.embeddings=null"]
    run(load_config(StageConfig, None, [f"data.shards={shards}", f"out.dir={tmp_path / 'b'}", *over]))
    a, b = dict(read_shard(tmp_path / "a" / "00002.tar")), dict(read_shard(tmp_path / "b" / "00002.tar"))
    assert a.keys() == b.keys()
    assert all(a[k]["jpg"] == b[k]["jpg"] for k in a)  # same weights, same stats, same draws -> same pixels
    assert json.loads(a["000020000_s0"]["json"])["style"]["model"] == "public"
    assert json.loads(b["000020000_s0"]["json"])["style"]["model"] == "checkpoint"


def test_mixed_sizes_and_png_input(tmp_path: Path, embeddings: str) -> None:
    """Images of different sizes in one batch are grouped by size; a PNG input becomes a JPEG original."""
    rng = np.random.default_rng(1)
    sizes = [(46, 58), (50, 40), (46, 58)]
    with ShardWriter(tmp_path / "in", 0) as w:
        for i, (h, wd) in enumerate(sizes):
            w.write(f"0000000{i:02d}", _jpeg(rng, h, wd), f"c{i}", {"captions": [f"c{i}"]})
        w.finish({})
    # a PNG member written by hand (img2dataset can emit png)
    buf = io.BytesIO()
    Image.fromarray((rng.random((44, 44, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
    with open(tmp_path / "in" / "00001.tar", "wb") as fh, tarfile.open(fileobj=fh, mode="w") as tar:
        for name, data in (("000010000.png", buf.getvalue()), ("000010000.txt", b"png caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    run(cfg_for(str(tmp_path / "in" / "{00000..00001}.tar"), out, embeddings, "style.k=1"))
    got = dict(read_shard(out / "00000.tar"))
    for i, (h, wd) in enumerate(sizes):
        assert decode(got[f"0000000{i:02d}_s0"]["jpg"]).shape == (h, wd, 3)
    png = dict(read_shard(out / "00001.tar"))
    assert Image.open(io.BytesIO(png["000010000"]["jpg"])).format == "JPEG"
    assert png["000010000"]["txt"] == b"png caption"
