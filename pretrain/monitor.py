"""Rank-0 run monitoring: TensorBoard scalars/images/text, ``metrics.jsonl`` lines and a tqdm progress bar.

Every method is a no-op on ranks other than 0, so the training loop calls them unconditionally. On resume from
step ``s`` the TensorBoard writer purges events at steps >= s and ``metrics.jsonl`` drops its lines after ``s``,
so a resumed run's logs read exactly like an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from launch.files import atomic_write_bytes

log = logging.getLogger("vlp.monitor")


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value  # JSON has no NaN; inf is written by json as Infinity
    return value


def truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Keep only the lines of ``path`` whose ``step`` is <= ``keep_through_step`` (atomic rewrite)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a hard kill
        if int(row.get("step", 0)) <= keep_through_step:
            kept.append(line)
    atomic_write_bytes(path, ("\n".join(kept) + ("\n" if kept else "")).encode())


class Monitor:
    """Logging sink of one run; active on rank 0 only."""

    def __init__(
        self, run_dir: str | os.PathLike, *, active: bool, start_step: int, total_steps: int, progress: bool = True
    ) -> None:
        self.active = active
        self.run_dir = Path(run_dir)
        self.writer = None
        self.bar = None
        self._jsonl = None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.run_dir / "metrics.jsonl"
        evals = self.run_dir / "eval.jsonl"
        if start_step > 0:
            truncate_jsonl(metrics, start_step)
            truncate_jsonl(evals, start_step)
        else:
            for p in (metrics, evals):
                p.unlink(missing_ok=True)
        self._jsonl = open(metrics, "a")  # noqa: SIM115 - kept open for the run, closed in close()
        self._eval_jsonl = None  # opened on the first evaluation
        # purge_step hides events a crashed run wrote after the checkpoint we resumed from
        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step if start_step else None)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    @property
    def tensorboard_dir(self) -> Path:
        return self.run_dir / "tensorboard"

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "train/") -> None:
        """TensorBoard scalars ``prefix + name`` at ``step`` (None and non-numbers skipped)."""
        if not self.active:
            return
        for name, value in values.items():
            value = _plain(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = name if "/" in name else prefix + name
                self.writer.add_scalar(tag, value, step)

    def jsonl(self, row: dict[str, Any]) -> None:
        """Append one line to ``metrics.jsonl`` and flush it (tests and scripts read it while training runs)."""
        if not self.active:
            return
        self._jsonl.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
        self._jsonl.flush()

    def eval_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        self.scalars(step, metrics, prefix="eval/")
        if self._eval_jsonl is None:
            self._eval_jsonl = open(self.run_dir / "eval.jsonl", "a")  # noqa: SIM115 - closed in close()
        self._eval_jsonl.write(json.dumps({"step": step, **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self._eval_jsonl.flush()
        log.info("step %d eval: %s", step, ", ".join(f"{k}={_plain(v)}" for k, v in metrics.items()))

    def image_pairs(
        self,
        step: int,
        sources: torch.Tensor,
        partners: torch.Tensor,
        mixed: torch.Tensor,
        captions: Sequence[str],
        mean: Sequence[float],
        std: Sequence[float],
        tag: str = "mixgen",
    ) -> None:
        """A grid with one row per mixed pair: source image, partner image, mixture; captions as text."""
        if not self.active or sources.numel() == 0:
            return
        from torchvision.utils import make_grid

        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        rows = torch.stack([sources, partners, mixed], dim=1).flatten(0, 1).float().cpu()
        rows = (rows * s + m).clamp(0, 1)
        self.writer.add_image(f"{tag}/pairs", make_grid(rows, nrow=3, padding=2), step)
        text = "\n\n".join(f"{i}. {c}" for i, c in enumerate(captions))
        self.writer.add_text(f"{tag}/captions", text, step)

    def image_grids(self, step: int, images: dict[str, torch.Tensor], tag: str = "images") -> None:
        """One TensorBoard grid per entry (``[N,3,H,W]`` in [0, 1]; sizes may differ between entries)."""
        if not self.active:
            return
        from torchvision.utils import make_grid

        for name, batch in images.items():
            if batch is not None and batch.numel():
                grid = make_grid(batch.detach().float().cpu().clamp(0, 1), nrow=len(batch), padding=2)
                self.writer.add_image(f"{tag}/{name}", grid, step)

    def progress(self, step: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.n = step
        if postfix:
            self.bar.set_postfix({k: f"{_plain(v):.4g}" for k, v in postfix.items() if _plain(v) is not None})
        self.bar.refresh()

    @property
    def has_progress_bar(self) -> bool:
        return self.bar is not None

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        self.writer.close()
        self._jsonl.close()
        if self._eval_jsonl is not None:
            self._eval_jsonl.close()
        self.active = False
