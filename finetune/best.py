"""Keeping the best fine-tuned weights by a validation metric, across restarts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BEST = "best.safetensors"  # in run.dir: the backbone weights of the best validation result


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a metrics dict (what results.json and TensorBoard record)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class BestKeeper:
    """Tracks the best validation metric and writes those weights to ``run.dir/best.safetensors`` (rank 0).

    The record ``run.dir/best.json`` survives a restart, so a resumed run only replaces a better checkpoint.
    Higher is better.
    """

    def __init__(self, run_dir: Path, metric: str, rank: int, model_meta: dict[str, Any]) -> None:
        self.run_dir, self.metric, self.rank, self.meta = run_dir, metric, rank, model_meta
        self.record_path = run_dir / "best.json"
        self.record: dict[str, Any] | None = None
        if self.record_path.is_file():
            self.record = json.loads(self.record_path.read_text())

    @property
    def path(self) -> Path:
        return self.run_dir / BEST

    def offer(self, step: int, metrics: dict[str, Any], module: Any) -> bool:
        """Keep ``module``'s weights if ``metrics`` beat the record; True when they did."""
        if self.metric not in metrics:
            raise KeyError(f"eval.metric: {self.metric!r} is not among the task's metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.record is not None and value <= float(self.record["value"]):
            return False
        self.record = {"step": step, "metric": self.metric, "value": value, "metrics": scalars(metrics)}
        if self.rank == 0:
            from launch.files import atomic_write_json
            from pretrain.export import export_safetensors

            export_safetensors(module.state_dict(), self.path, {"model": self.meta, **self.record})
            atomic_write_json(self.record_path, self.record)
        return True
