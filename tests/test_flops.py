"""Model FLOPs per sample and MFU: the counter against a hand computation, and the engine's logged values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.flops import ForwardFlops, mfu, training_flops_per_sample


def test_forward_flops_of_a_tiny_model_match_a_hand_count():
    # batch 4: a 3x3 convolution 3->8 channels on 6x6 (padding 1), global pooling, then linear 8->5 and 5->2
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 2),
    )  # fmt: skip
    images = torch.randn(4, 3, 6, 6)
    flops = ForwardFlops()
    assert flops.total is None
    with flops.count():
        model(images)
    # a multiply-add is 2 FLOPs: conv 2*B*H*W*Cout*Cin*k*k, linear 2*B*in*out (biases, activations, pooling: 0)
    conv = 2 * 4 * 6 * 6 * 8 * 3 * 3 * 3
    linear = 2 * 4 * 8 * 5 + 2 * 4 * 5 * 2
    assert flops.total == conv + linear == 62_608
    per_sample = training_flops_per_sample(flops.total, 4)
    assert per_sample == 3 * (conv + linear) / 4  # forward + backward = three forwards
    # 1000 samples/s on a device of peak 1e8 FLOP/s
    assert mfu(per_sample, 1000.0, 1e8) == pytest.approx(per_sample * 1000.0 / 1e8)
    assert mfu(per_sample, 1000.0, 0.0) is None  # no peak configured: no MFU
