"""CoMER's Attention Refinement Module (ARM) and the CBAM that HMER-MTL puts inside it.

The ARM turns coverage maps (attention summed over past decoding steps) into a per-head correction of the
cross-attention logits (Zhao & Gao, ECCV 2022; official ``comer/model/transformer/arm.py``):

    coverage [M, C, h, w] -> Conv 5x5 (C -> dc) -> ReLU -> [CBAM] -> zero the padding -> Conv 1x1 (dc -> nhead, no
    bias) -> BatchNorm over the non-padded positions only -> [M, nhead, h, w]

``M`` is rows x decoding steps; every step's coverage map is refined on its own, so the same module serves
teacher forcing (all steps at once) and incremental decoding (one step at a time, see ``decoders/comer.py``).
The caller builds the coverage (which attention maps, summed over which steps); this module only maps it.

In eval mode every operation is per position or per (row, step) map, with BatchNorm on its running statistics,
which is what makes incremental decoding exact.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def batch_norm_valid(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Apply ``bn`` to the non-padded positions of x [M, C, h, w] only (pad [M, h, w], True = padding).

    In training the statistics (and the running averages) come from the valid positions alone, as the official
    ``MaskBatchNorm2d`` computes them; padded positions are returned unchanged. Works for BatchNorm1d/2d modules.
    """
    channels_last = x.permute(0, 2, 3, 1)  # [M, h, w, C]
    valid = ~pad
    picked = channels_last[valid]  # [n, C]
    if isinstance(bn, nn.BatchNorm2d):
        normed = bn(picked[:, :, None, None]).flatten(1)
    else:
        normed = bn(picked)
    out = channels_last.masked_scatter(valid[..., None], normed.to(x.dtype))
    return out.permute(0, 3, 1, 2)


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the non-padded positions of a [M, C, h, w] map (the official ``MaskBatchNorm2d``).

    Holds a ``BatchNorm1d`` named ``bn`` so that official checkpoints (``post_norm.bn.*``) map by a rename.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        return batch_norm_valid(self.bn, x, pad)


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


class AttentionRefinement(nn.Module):
    """Coverage maps [M, in_channels, h, w] + padding [M, h, w] -> logit corrections [M, nhead, h, w].

    ``in_channels`` is ``2 * nhead`` with cross and self coverage, ``nhead`` with one of them. ``cbam``: insert
    a CBAM (HMER-MTL) after the 5x5 conv's ReLU, before the padding is zeroed.
    """

    def __init__(self, nhead: int, in_channels: int, dc: int = 32, cbam: bool = False, cbam_ratio: int = 2,
                 cbam_kernel: int = 7, cbam_mask_aware: bool = False):
        super().__init__()
        self.nhead = nhead
        self.conv = nn.Conv2d(in_channels, dc, kernel_size=5, padding=2)
        self.cbam = CBAM(dc, cbam_ratio, cbam_kernel, cbam_mask_aware) if cbam else None
        self.proj = nn.Conv2d(dc, nhead, kernel_size=1, bias=False)
        self.norm = MaskedBatchNorm(nhead)

    def forward(self, coverage: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(coverage))
        if self.cbam is not None:
            x = self.cbam(x, pad)
        # zeroing before the bias-free 1x1 conv keeps padded positions at exactly 0 through the masked BatchNorm
        x = self.proj(x.masked_fill(pad[:, None], 0.0))
        return self.norm(x, pad)
