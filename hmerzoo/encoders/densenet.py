"""DenseNet-B, the image encoder shared by ABM, BTTR, CoMER and their descendants.

Layout (reference-models.md §0): a 7x7/2 stem conv (+ BN "norm1" in the BTTR family) -> ReLU -> 2x2 max pool,
then three dense blocks of bottleneck layers separated by two compressing transitions (avg pool), and
(BTTR family) a final BatchNorm "post_norm". Every conv is followed by BN then ReLU ("post-activation"), which
is not the usual pre-activation DenseNet. Submodule names are those of the official ``DenseNet`` so official
checkpoints map onto this module by a plain prefix rename.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.dropout import UniformMaskDropout
from ..registry import ENCODERS


class Bottleneck(nn.Module):
    """1x1 conv to 4g -> BN -> ReLU -> dropout -> 3x3 conv to g -> BN -> ReLU -> dropout, concatenated to the input."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float):
        super().__init__()
        inter_channels = 4 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, inter_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inter_channels)
        self.conv2 = nn.Conv2d(inter_channels, growth_rate, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(growth_rate)
        self.dropout = UniformMaskDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(F.relu(self.bn1(self.conv1(x))))
        out = self.dropout(F.relu(self.bn2(self.conv2(out))))
        return torch.cat((x, out), dim=1)


class Transition(nn.Module):
    """1x1 compressing conv -> BN -> ReLU -> dropout -> 2x2 average pool (ceil_mode, so odd sizes keep their border)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.dropout = UniformMaskDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(F.relu(self.bn1(self.conv1(x))))
        return F.avg_pool2d(out, 2, ceil_mode=True)


def _downsample_mask(mask: torch.Tensor) -> torch.Tensor:
    # The official code keeps every other row/column (strided slicing), not a pooled mask; with ceil_mode pooling
    # this gives exactly the feature map's size.
    return mask[:, 0::2, 0::2]


def _contiguous_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    # channels-last parameters would be non-contiguous in the state dict, which safetensors refuses
    for key, value in state_dict.items():
        if key.startswith(prefix) and not isinstance(value, nn.Parameter) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


@ENCODERS.register("densenet")
class DenseNetB(nn.Module):
    """DenseNet-B encoder: images [B,1,H,W] + mask [B,H,W] (True = pad) -> features [B,C,H/16,W/16] + mask.

    ``stem_norm`` / ``post_norm``: the BatchNorm after the stem conv and after the last block, present in
    BTTR/CoMER and absent in ABM/CAN. ``num_layers`` is the number of bottleneck layers per block.
    ``init``: ``default`` (PyTorch's, as BTTR/CoMER) or ``kaiming_uniform`` (ABM's train.py: Kaiming-uniform,
    gain sqrt 2, on every conv weight).
    ``channels_last``: run the convolutions on channels-last activations (same results; oneDNN and cuDNN are
    faster with it, ~20% of a CPU training step); the 4-D weights are kept channels-last too, and ``state_dict``
    returns them contiguous, so saved files and ``safetensors.save_file(model.state_dict())`` are unaffected.
    """

    def __init__(self, growth_rate: int = 24, num_layers: int = 16, num_blocks: int = 3, reduction: float = 0.5,
                 dropout: float = 0.2, stem_norm: bool = True, post_norm: bool = True, in_channels: int = 1,
                 channels_last: bool = True, init: str = "default"):
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"densenet: num_blocks must be at least 1, got {num_blocks}")
        channels = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.norm1 = nn.BatchNorm2d(channels) if stem_norm else None
        # dense1, trans1, dense2, trans2, dense3 (official names), as attributes so the state-dict keys match
        for block in range(1, num_blocks + 1):
            layers = []
            for _ in range(num_layers):
                layers.append(Bottleneck(channels, growth_rate, dropout))
                channels += growth_rate
            setattr(self, f"dense{block}", nn.Sequential(*layers))
            if block < num_blocks:
                out_channels = int(math.floor(channels * reduction))
                setattr(self, f"trans{block}", Transition(channels, out_channels, dropout))
                channels = out_channels
        self.num_blocks = num_blocks
        self.channels_last = channels_last
        self.out_channels = channels
        self.post_norm = nn.BatchNorm2d(channels) if post_norm else None
        if init == "kaiming_uniform":
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_uniform_(module.weight)
        elif init != "default":
            raise ValueError(f"densenet: init must be 'default' or 'kaiming_uniform', got {init!r}")
        if channels_last:
            self.to(memory_format=torch.channels_last)
            self.register_state_dict_post_hook(_contiguous_state_dict)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = self.conv1(images)
        if self.norm1 is not None:
            out = self.norm1(out)
        out = F.max_pool2d(F.relu(out), 2, ceil_mode=True)
        mask = _downsample_mask(_downsample_mask(mask))  # stride-2 conv, then max pool
        for block in range(1, self.num_blocks + 1):
            out = getattr(self, f"dense{block}")(out)
            if block < self.num_blocks:
                out = getattr(self, f"trans{block}")(out)
                mask = _downsample_mask(mask)
        if self.post_norm is not None:
            out = self.post_norm(out)
        return out, mask
