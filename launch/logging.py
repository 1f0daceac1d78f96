"""Process-aware logging: rank 0 logs at INFO, other ranks at WARNING, each line tagged with its rank."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(rank: int | None = None, level: int = logging.INFO, file: str | None = None) -> logging.Logger:
    """Configure the root logger once per process; returns the project logger."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if file:
        fh = logging.FileHandler(file)
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.setLevel(level if rank == 0 else max(level, logging.WARNING))
    return logging.getLogger("vlp")


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"vlp.{name}")


def report_config_error(exc: BaseException) -> int:
    """Print ``config error: <exc>`` once per job (rank 0 only: every rank finds the same error) and return 2,
    the exit status of every entry point for a configuration problem."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank in ("", "0"):
        print(f"config error: {exc}", file=sys.stderr, flush=True)
    return 2


def announce_run_folder(path: str | os.PathLike, what: str = "run folder") -> None:
    """Print ``run folder: <absolute path>`` on rank 0, the first line of every run, so its outputs can be found."""
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    if rank in ("", "0"):
        print(f"{what}: {os.path.abspath(os.fspath(path))}", flush=True)


def is_rank0() -> bool:
    """True in the process that reports for the job (rank 0, or a plain single process)."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) in ("", "0")
