"""CBAM (Woo et al., 2018) as HMER-MTL puts it inside CoMER's attention refinement: a channel gate, then a
spatial gate, optionally blind to padded positions."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masked_batch_norm import batch_norm_valid


class ChannelAttention(nn.Module):
    """CBAM's channel gate: sigmoid(MLP(avg-pool) + MLP(max-pool)) * x, the MLP being two 1x1 convs with bias."""

    def __init__(self, channels: int, ratio: int = 2):
        super().__init__()
        if channels % ratio != 0:
            raise ValueError(f"CBAM: channels {channels} are not divisible by ratio {ratio}")
        self.reduce = nn.Conv2d(channels, channels // ratio, kernel_size=1)
        self.expand = nn.Conv2d(channels // ratio, channels, kernel_size=1)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(F.relu(self.reduce(x)))

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """``pad`` [M, h, w] (True = padding): pool over the valid positions only; None pools over everything,
        padded positions included, as the official code does."""
        if pad is None:
            avg = x.mean(dim=(2, 3), keepdim=True)
            peak = x.amax(dim=(2, 3), keepdim=True)
        else:
            valid = (~pad)[:, None]  # [M, 1, h, w]
            count = valid.sum(dim=(2, 3), keepdim=True).clamp_min(1)
            avg = x.masked_fill(~valid, 0.0).sum(dim=(2, 3), keepdim=True) / count
            peak = x.masked_fill(~valid, float("-inf")).amax(dim=(2, 3), keepdim=True)
            peak = peak.masked_fill(torch.isinf(peak), 0.0)  # a map without valid positions (never in practice)
        return x * torch.sigmoid(self._mlp(avg) + self._mlp(peak))


class SpatialAttention(nn.Module):
    """CBAM's spatial gate: sigmoid(BN(Conv kxk([mean_c x; max_c x]))) * x (conv without bias, BatchNorm2d(1))."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"CBAM: the spatial kernel size must be odd, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """``pad`` [M, h, w]: zero the descriptor at padded positions (so the conv sees padding as it sees the
        border) and take the BatchNorm statistics over valid positions; None: the official behaviour."""
        descriptor = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)
        if pad is None:
            gate = self.bn(self.conv(descriptor))
        else:
            descriptor = descriptor.masked_fill(pad[:, None], 0.0)
            gate = batch_norm_valid(self.bn, self.conv(descriptor), pad)
        return x * torch.sigmoid(gate)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al., 2018) as HMER-MTL uses it: channel then spatial gate.

    ``mask_aware=False`` (faithful): the gates see padded positions like any other (the official global pools
    average and max over the padded area too, so the result depends on how much padding the batch has).
    ``mask_aware=True``: padded positions are zeroed first and excluded from the pools and the spatial
    BatchNorm statistics, so the output at valid positions does not depend on padding. Same parameters either way.
    """

    def __init__(self, channels: int, ratio: int = 2, kernel_size: int = 7, mask_aware: bool = False):
        super().__init__()
        self.mask_aware = mask_aware
        self.channel_attention = ChannelAttention(channels, ratio)
        self.spatial_attention = SpatialAttention(kernel_size)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if self.mask_aware:
            x = x.masked_fill(pad[:, None], 0.0)
            return self.spatial_attention(self.channel_attention(x, pad), pad)
        return self.spatial_attention(self.channel_attention(x))

    def extra_repr(self) -> str:
        return f"mask_aware={self.mask_aware}"
