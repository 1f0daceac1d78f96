"""Model FLOPs per sample and model FLOPs utilisation (MFU), as nanoGPT reports them.

The forward pass of one real micro-batch is counted once per run by :class:`torch.utils.flop_counter.FlopCounterMode`
(matrix multiplications, convolutions and attention; elementwise work is not counted, as in the MFU literature).
Training costs three forwards (the backward pass computes gradients for inputs and weights: about twice the
forward), so ``flops_per_sample = 3 * forward_flops / batch_size`` (nanoGPT's ``6 N`` per token is the same rule
for a transformer: ``2 N`` forward). Frozen towers and momentum (EMA) encoders only run forward, so for those models
the figure is an upper bound. ``MFU = flops_per_sample * samples/s per device / peak FLOP/s per device``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.utils.flop_counter import FlopCounterMode

TRAINING_PER_FORWARD = 3  # forward + backward (gradients of activations and of weights)


class ForwardFlops:
    """Counts the FLOPs of what runs inside :meth:`count` (once); ``total`` is None until then."""

    def __init__(self) -> None:
        self.total: int | None = None

    @contextlib.contextmanager
    def count(self) -> Iterator[None]:
        with FlopCounterMode(display=False) as counter:
            yield
        self.total = int(counter.get_total_flops())


def training_flops_per_sample(forward_flops: int, batch_size: int) -> float:
    """Model FLOPs of one training sample (forward and backward) from the forward FLOPs of a batch."""
    return TRAINING_PER_FORWARD * forward_flops / max(1, batch_size)


def mfu(flops_per_sample: float, samples_per_s_per_device: float, peak_flops: float) -> float | None:
    """Achieved model FLOP/s of one device as a fraction of its peak (None without a peak)."""
    if peak_flops <= 0:
        return None
    return flops_per_sample * samples_per_s_per_device / peak_flops
