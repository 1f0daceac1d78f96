import os
from pathlib import Path

import pytest
import torch
from helpers import build_synthetic

# `make test` runs two xdist workers on a two-core machine. With more than one OpenMP thread each, the workers
# oversubscribe the cores and PyTorch's spinning threads slow in-process tests several-fold (measured: one style
# test 4.5 s with one thread vs 34 s with two while the other core was busy). The environment variable is for the
# subprocesses that inherit this one's environment (helpers.subprocess_env already sets it).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> Path:
    """The train shards of the small pretraining tests: 64 samples of 32 px in 4 shards of 16 (read-only)."""
    out = build_synthetic(tmp_path_factory.mktemp("synthetic"), image_size=32, samples_per_shard=16, train=64)
    return out / "train"
