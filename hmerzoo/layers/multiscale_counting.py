"""CAN's multi-scale counting module (MSCM; Li et al., ECCV 2022): per-class symbol counts read off a feature map.

Official ``models/counting.py`` and ``models/can.py``. Each branch is

    Conv(C -> 512, k x k, no bias) + BatchNorm -> SE channel attention (global mean, FC 512 -> 32, ReLU,
    FC 32 -> 512, sigmoid, rescale) -> Conv 1x1 (512 -> classes, no bias) + sigmoid -> x mask -> spatial sum

and the module has two branches, kernels 3 and 5; the count vector is their mean. The channel attention's global
mean runs over the whole map, padded positions included, as the official ``AdaptiveAvgPool2d``; only the final
per-position counts are masked.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(FC(ReLU(FC(mean over the map))))."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.ReLU(),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean((2, 3)))[:, :, None, None]


class CountingBranch(nn.Module):
    """One MSCM branch: features [B,C,h,w] (+ mask [B,h,w], True = pad) -> (counts [B,K], maps [B,K,h,w])."""

    def __init__(self, in_channels: int, classes: int, kernel_size: int, channels: int = 512, reduction: int = 16):
        super().__init__()
        self.trans_layer = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(channels))
        self.channel_att = ChannelAttention(channels, reduction)
        self.pred_layer = nn.Sequential(nn.Conv2d(channels, classes, kernel_size=1, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.pred_layer(self.channel_att(self.trans_layer(x)))
        if mask is not None:
            maps = maps * (~mask.bool())[:, None].to(maps.dtype)
        return maps.sum((2, 3)), maps


class MultiScaleCounting(nn.Module):
    """The MSCM: one :class:`CountingBranch` per kernel size (official: 3 and 5); ``forward`` returns the list of
    each branch's counts [B,K] and their mean (the count vector CAN's decoder reads)."""

    def __init__(self, in_channels: int, classes: int, kernel_sizes: Sequence[int] = (3, 5), channels: int = 512,
                 reduction: int = 16):
        super().__init__()
        kernels = [int(k) for k in kernel_sizes]
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"counting: kernel_sizes must be odd sizes, got {list(kernel_sizes)}")
        self.classes = classes
        self.branches = nn.ModuleList(CountingBranch(in_channels, classes, k, channels, reduction) for k in kernels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        counts = [branch(x, mask)[0] for branch in self.branches]
        return counts, torch.stack(counts).mean(0)
