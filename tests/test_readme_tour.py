"""The README's tour, run from the README's own text: every command of its table, top to bottom, as written, in a
fresh working folder, with tiny-size overrides appended. A row that changes in README.md changes what runs here, so
the tour cannot drift from the code; a new row this test does not know fails until it is given tiny sizes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pytest

from tests.helpers import REPO, subprocess_env

# a small model every training row shares, so the fine-tune row's init matches the pretrain row's run
CLIP_TINY = ["data.image_size=32", "model.image_size=32", "model.vision.kwargs.channels=[8,16,32,64]",
             "model.text.config.num_hidden_layers=1", "model.embed_dim=32"]  # fmt: skip
TRAIN_TINY = ["--nproc", "1", "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=2",
              "data.batch_size=4", "data.num_workers=0"]  # fmt: skip
# (module words, recipe) -> overrides appended to the README's command
TINY = {
    ("data_prep synthetic", "configs/data_prep/synthetic.yaml"): [
        "splits.train=32", "splits.val=8", "splits.test=8", "out.image_size=32", "out.samples_per_shard=8",
    ],
    ("data_prep build", "configs/data_prep/img2dataset.yaml"): ["out.image_size=32", "out.samples_per_shard=8",
                                                                "workers=0"],
    ("data_prep inspect", None): ["--num", "4"],
    ("launch local data_prep style", "configs/style/stage.yaml"): [
        "--nproc", "1", "data.batch_size=4", "data.num_workers=0", "out.tensorboard=false", "out.grid_images=2",
        "model.use_predictor=false",  # 32 px is below the predictor's 43 px minimum
    ],
    ("launch local pretrain", "configs/pretrain/clip_tiny.yaml"): [*TRAIN_TINY, *CLIP_TINY],
    ("launch local pretrain", "configs/pretrain/albef_tiny.yaml"): [
        *TRAIN_TINY, "model.text.config.num_hidden_layers=2", "model.fusion_layer=1", "model.queue_size=8",
        "model.embed_dim=16", "model.vision.kwargs.depth=1",
    ],
    ("launch local finetune", "configs/finetune/retrieval_synthetic.yaml"): [
        *TRAIN_TINY, *CLIP_TINY, "eval.batch_size=8", "eval.every=0", "eval.qualitative=0",
    ],
}  # fmt: skip


def tour_commands(readme: str) -> list[str]:
    """The backticked command of each row of the table under '## A tour of the stages', in order."""
    section = readme.split("## A tour of the stages", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|") and "`" in line]
    return [re.search(r"\|\s*`([^`]+)`\s*\|\s*$", row).group(1) for row in rows]


def _key(argv: list[str]) -> tuple[str, str | None]:
    """('data_prep build', 'configs/...yaml') for a ``python -m ...`` command line."""
    assert argv[:2] == ["python", "-m"], f"tour rows start with `python -m`: {argv}"
    words = []
    for word in argv[2:]:
        if word.startswith("-") or "=" in word or "/" in word:
            break
        words.append(word)
    config = argv[argv.index("--config") + 1] if "--config" in argv else None
    return " ".join(words), config


def test_tour_is_parsed_from_the_readme():
    commands = tour_commands((REPO / "README.md").read_text())
    assert len(commands) == len(TINY) and all(c.startswith("python -m ") for c in commands)
    for cmd in commands:  # every output the tour reads was written by an earlier row, all under runs/tour
        assert "runs/demo" not in cmd and "data/synthetic" not in cmd


@pytest.mark.slow
def test_readme_tour_runs_top_to_bottom(tmp_path):
    commands = tour_commands((REPO / "README.md").read_text())
    env = subprocess_env()
    seen = set()
    for cmd in commands:
        argv = shlex.split(cmd)
        key = _key(argv)
        assert key in TINY, f"README tour row not known to this test (give it tiny sizes in TINY): {cmd}"
        seen.add(key)
        full = [sys.executable, *argv[1:], *TINY[key]]
        proc = subprocess.run(full, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{cmd}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{proc.stderr[-4000:]}"
        if key[0].startswith(("launch", "data_prep build", "data_prep synthetic")):
            first = proc.stdout.splitlines()[0]
            assert first.startswith(("run folder: ", "output folder: ")), proc.stdout[:500]
        if key[0] in ("launch local pretrain", "launch local finetune"):
            assert "checkpoint saved: " in proc.stderr and "step2" in proc.stderr  # one log line per checkpoint
        if key[0] == "launch local data_prep style":
            assert "img/s" in proc.stderr  # rank 0's progress bar
    assert seen == set(TINY)

    tour = tmp_path / "runs" / "tour"
    assert sorted(p.name for p in (tour / "data" / "train").glob("*.tar")) == [f"{i:05d}.tar" for i in range(4)]
    built = json.loads((tour / "shards" / "manifest.json").read_text())
    assert built["num_samples"] == 32 and built["num_failed"] == 0
    assert (tour / "sheet.png").stat().st_size > 0
    assert json.loads((tour / "style" / "manifest.json").read_text())["num_samples"] == 64  # original + 1 copy
    for run in ("clip", "albef"):
        summary = json.loads((tour / run / "summary.json").read_text())
        assert summary["steps"] == 2, run
    results = json.loads((tour / "retrieval" / "results.json").read_text())
    assert results["init"] == "runs/tour/clip" and "test" in results["splits"]
