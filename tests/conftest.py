import os

# `make test` runs two xdist workers on a two-core machine. With more than one OpenMP thread each, the workers
# oversubscribe the cores and PyTorch's spinning threads slow in-process tests several-fold (measured: one style
# test 4.5 s with one thread vs 34 s with two while the other core was busy). Subprocesses already get one thread
# (helpers.subprocess_env). Set before torch is imported anywhere in the worker.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import build_synthetic  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # in case a plugin imported torch before this file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory) -> Path:
    """The train shards of the small pretraining tests: 64 samples of 32 px in 4 shards of 16 (read-only)."""
    out = build_synthetic(tmp_path_factory.mktemp("synthetic"), image_size=32, samples_per_shard=16, train=64)
    return out / "train"
