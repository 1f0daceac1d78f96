import os
from pathlib import Path

import pytest
from helpers import build_synthetic

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> Path:
    """The train shards of the small pretraining tests: 64 samples of 32 px in 4 shards of 16 (read-only)."""
    out = build_synthetic(tmp_path_factory.mktemp("synthetic"), image_size=32, samples_per_shard=16, train=64)
    return out / "train"
