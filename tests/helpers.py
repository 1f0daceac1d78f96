"""What several test files share: the repository path, the offline environment for subprocesses, the 2-process
torchrun command, tiny synthetic shards built by ``python -m data_prep synthetic``, and reading metrics.jsonl."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Subprocesses must never reach a model hub, and must not pick a CUDA/accelerator backend or oversubscribe 2 cores.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment plus the offline settings, the repository on PYTHONPATH, and ``extra``."""
    return {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO), **extra}


def run_torchrun(args: list[str], *, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """``torchrun`` with 2 local processes from the repository root; output captured as text, never raises."""
    return subprocess.run(
        TORCHRUN + args, cwd=REPO, env=subprocess_env(**extra_env), capture_output=True, text=True, timeout=timeout
    )


def build_synthetic(
    out_dir: Path, *, image_size: int, samples_per_shard: int, train: int, val: int = 0, test: int = 0
) -> Path:
    """Write the synthetic data set (shards and annotation files for each split) under ``out_dir``; return it."""
    subprocess.run(
        [sys.executable, "-m", "data_prep", "synthetic", "--config", "configs/data_prep/synthetic.yaml",
         f"out.dir={out_dir}", f"out.image_size={image_size}", f"out.samples_per_shard={samples_per_shard}",
         f"splits.train={train}", f"splits.val={val}", f"splits.test={test}"],
        cwd=REPO, env=subprocess_env(), check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    return Path(out_dir)


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl in file order (blank lines, e.g. while a run is writing, are skipped)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def download_reason(downloader, url: str) -> str:  # noqa: ANN001 - a data_prep.download.Downloader
    """The ``reason`` of the DownloadError that fetching ``url`` raises (fails the test if it does not raise)."""
    import pytest

    from data_prep.download import DownloadError

    with pytest.raises(DownloadError) as info:
        downloader.fetch(url)
    return info.value.reason
