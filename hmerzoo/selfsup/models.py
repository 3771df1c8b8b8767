"""The composite models of Mask & Match's self-supervised stages, registered in MODELS (``model.type``).

Both keep the trainer's contract (``forward(batch) -> {"loss", "losses"}``, ``vocab``, ``recipe``,
``num_parameters``) and read nothing but ``batch.images`` and ``batch.image_mask``: captions, when the data has
them, are ignored. Both zero the padded pixels first, so the padding's content never reaches a loss. Parameter
names follow the recognizer's: the encoder is ``encoder.*`` (and the attention network ``neck.*``), so the next
stage's ``model.init_from`` finds them.

- ``mask_match_pretrain`` (stage 1): two views of each image (views.py) through one encoder pass; a global
  projection head on the masked mean of the feature map, a local (1x1 conv) head on every cell; the loss
  (``loss.type: mask_match_contrastive``) gets both views' vectors, cells, masks and source points.
- ``mask_match_attention`` (stage 2): the unmasked image and a copy with blocks of cells hidden (masking.py; the
  ratio follows ``mask`` in optimizer steps, told by the trainer through ``set_training_step``) through the
  encoder; the attention network (``model.neck``) pools each into one vector, a projection head maps it, and the
  loss (``loss.type: mask_match``) makes the masked view's vector pick out its unmasked view's.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..errors import HmerzooError
from ..registry import MODELS
from .masking import MaskSchedule, block_mask, hide_pixels
from .views import TwoViews, feature_points, ink_cells


def mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))


def masked_mean(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] averaged over the valid cells -> [B, C]."""
    valid = (~mask)[:, None].to(features.dtype)
    return (features * valid).sum((2, 3)) / valid.sum((2, 3)).clamp(min=1)


class SelfSupervisedModel(nn.Module):
    captions = False  # the builder gives a vocabulary of the special tokens when the data root has no dictionary

    def __init__(self, vocab: Any, encoder: nn.Module, loss: nn.Module, recipe: dict | None, feature_stride: int):
        super().__init__()
        self.vocab, self.encoder, self.loss, self.recipe = vocab, encoder, loss, recipe
        self.feature_stride = feature_stride

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _nothing_to_decode(self, what: str) -> HmerzooError:
        kind = (self.recipe or {}).get("model", {}).get("type")
        return HmerzooError(f"model.type={kind}: a self-supervised stage has no decoder, so it cannot {what}; "
                            "fine-tune it on captions first (recipes/mask_match.yaml with model.init_from=THIS_RUN)")

    def greedy(self, images: torch.Tensor, image_mask: torch.Tensor, **kwargs: Any) -> list[list[int]]:
        # what validation calls: say how to switch it off
        raise HmerzooError(f"{self._nothing_to_decode('be validated')}; or set data.val_holdout=0 (and no "
                           "data.val_split) or train.val_every=0")

    def recognize(self, images: Any, **kwargs: Any) -> list:
        raise self._nothing_to_decode("recognize images (hmerzoo predict / eval)")

    @staticmethod
    def inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.images * (~batch.image_mask)[:, None].to(batch.images.dtype), batch.image_mask

    @staticmethod
    def result(losses: dict[str, torch.Tensor], **extra: Any) -> dict[str, Any]:
        return {"loss": sum(losses.values()), "losses": losses, **extra}


@MODELS.register("mask_match_pretrain")
class MaskMatchPretrain(SelfSupervisedModel):
    """Stage 1. ``views``: TwoViews' arguments; ``proj_dim``/``hidden``: the projection heads' sizes."""

    def __init__(self, vocab: Any, encoder: nn.Module, loss: nn.Module, recipe: dict | None = None,
                 views: dict | None = None, proj_dim: int = 128, hidden: int = 512, feature_stride: int = 16):
        super().__init__(vocab, encoder, loss, recipe, feature_stride)
        channels = encoder.out_channels
        self.views = TwoViews(**(views or {}))
        self.global_head = mlp(channels, hidden, proj_dim)
        self.local_head = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(hidden, proj_dim, 1))

    def forward(self, batch: Batch) -> dict[str, Any]:
        images, mask = self.inputs(batch)
        view1, view2 = self.views(images, mask)
        features, fmask = self.encoder(torch.cat([view1.images, view2.images]), torch.cat([view1.mask, view2.mask]))
        n = images.shape[0]
        pooled = self.global_head(masked_mean(features, fmask))
        dense = F.normalize(self.local_head(features), dim=1)
        stride = self.feature_stride
        out = {"stride": stride, "views": []}
        for i, view in enumerate((view1, view2)):
            part = slice(i * n, (i + 1) * n)
            out["views"].append({"global": pooled[part], "dense": dense[part], "mask": fmask[part],
                                 "points": feature_points(view.coords, view.mask, fmask.shape[1:], stride),
                                 "ink": ink_cells(view.images, stride)})
        return self.result(self.loss(out))


@MODELS.register("mask_match_attention")
class MaskMatchAttention(SelfSupervisedModel):
    """Stage 2. ``neck``: the attention network (``mask_match_attention``); ``mask``: MaskSchedule's arguments
    (start, end, schedule, steps, stages) plus ``block`` (cells per block side)."""

    def __init__(self, vocab: Any, encoder: nn.Module, neck: nn.Module, loss: nn.Module, recipe: dict | None = None,
                 mask: dict | None = None, proj_dim: int = 128, hidden: int = 512, feature_stride: int = 16):
        super().__init__(vocab, encoder, loss, recipe, feature_stride)
        if not callable(getattr(neck, "pool", None)):
            raise ValueError("model.neck must be an attention network with pool() (type: mask_match_attention)")
        options = dict(mask or {})
        self.block = int(options.pop("block", 2))
        if self.block < 1:
            raise ValueError(f"mask.block must be >= 1, got {self.block}")
        self.schedule = MaskSchedule(**options)
        self.neck = neck
        self.head = mlp(neck.out_channels, hidden, proj_dim)
        self.step = 0  # optimizer steps completed (set_training_step)

    def set_training_step(self, step: int) -> None:
        self.step = step

    def mask_ratio(self) -> float:
        return self.schedule(self.step)

    def forward(self, batch: Batch) -> dict[str, Any]:
        images, mask = self.inputs(batch)
        n = images.shape[0]
        stride = self.feature_stride
        cell_mask = mask[:, ::stride, ::stride]  # the encoder's feature-level padding (every other pixel, 4 times)
        hidden = block_mask(~cell_mask, self.mask_ratio(), self.block)
        masked = hide_pixels(images, hidden, stride)
        features, fmask = self.encoder(torch.cat([images, masked]), torch.cat([mask, mask]))
        pooled, focus = self.neck.pool(features, fmask)
        z = self.head(pooled)
        losses = self.loss({"unmasked": z[:n], "masked": z[n:]})
        return self.result(losses, focus=focus, hidden=hidden)
