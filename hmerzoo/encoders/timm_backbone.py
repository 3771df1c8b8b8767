"""Any timm CNN as an encoder: ``timm.create_model(name, features_only=True, in_chans=1)``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..registry import ENCODERS


@ENCODERS.register("timm")
class TimmEncoder(nn.Module):
    """The last feature map of a timm backbone, with the padding mask brought to its resolution.

    ``name`` is any timm model that supports ``features_only`` (e.g. ``resnet18``, ``convnext_atto``).
    ``pretrained`` is off by default: hmerzoo never downloads at run time; set it only where timm's weight
    cache is already filled. ``out_index`` picks the feature level (default: the deepest).
    """

    def __init__(self, name: str, pretrained: bool = False, out_index: int = -1, in_chans: int = 1,
                 **timm_kwargs):
        super().__init__()
        import timm

        self.backbone = timm.create_model(name, pretrained=pretrained, features_only=True, in_chans=in_chans,
                                          **timm_kwargs)
        info = self.backbone.feature_info
        self.level = out_index % len(info.channels())
        self.out_channels = int(info.channels()[self.level])
        self.stride = int(info.reduction()[self.level])

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(images)[self.level]
        return feats, self.downsample_mask(mask, feats.shape[-2:])

    def downsample_mask(self, mask: torch.Tensor, size: torch.Size) -> torch.Tensor:
        # Padding is bottom/right, so each sample's valid region is a top-left rectangle; a feature cell is
        # valid when its receptive field starts inside that rectangle (ceil of the valid extent / stride).
        h, w = int(size[0]), int(size[1])
        valid = ~mask
        valid_h = valid.any(dim=2).sum(dim=1)
        valid_w = valid.any(dim=1).sum(dim=1)
        rows = torch.arange(h, device=mask.device)
        cols = torch.arange(w, device=mask.device)
        fh = torch.ceil(valid_h.float() / self.stride).long().clamp(1, h)
        fw = torch.ceil(valid_w.float() / self.stride).long().clamp(1, w)
        valid_small = (rows[None, :, None] < fh[:, None, None]) & (cols[None, None, :] < fw[:, None, None])
        return ~valid_small
