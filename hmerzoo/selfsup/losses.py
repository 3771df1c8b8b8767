"""Mask & Match's self-supervised losses, registered in LOSSES.

- ``nt_xent``: SimCLR's normalized-temperature cross entropy over the 2B global vectors of two views.
- ``dense_info_nce``: a dense InfoNCE over feature-map cells; a cell's positive is the cell of the other view that
  shows the nearest source point (within ``radius`` cells), known from the views' geometry (as in PixPro/DenseCL,
  with the correspondence given rather than estimated); the negatives are the other view's remaining valid cells
  of the same image (``negatives: image``) or of the whole batch (``negatives: batch``).
- ``mask_match_contrastive``: stage 1's objective, ``global_weight * nt_xent + local_weight * dense_info_nce``.
- ``mask_match``: stage 2's objective: the attention-pooled vector of the masked view must pick out the unmasked
  view's vector of the same image among the batch's (InfoNCE), or simply align with it (``kind: cosine``).
Padded cells are never anchors, positives or negatives: their logits are removed before the softmax.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import LOSSES

NEGATIVES = ("image", "batch")
# logit of a padded cell: exp() of it is exactly 0 next to any real logit, yet a row of only padding stays finite
PADDED = -1e9


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the 2B anchors of -log softmax(sim/t)[positive], self-similarity excluded (SimCLR)."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    logits = z @ z.t() / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def nearest_positives(points_a: torch.Tensor, points_b: torch.Tensor, valid_b: torch.Tensor,
                      radius: float) -> tuple[torch.Tensor, torch.Tensor]:
    """For each cell of view a ([B, n, 2] source points), the index of the valid cell of view b showing the nearest
    source point, and whether it lies within ``radius`` (same units as the points)."""
    dist = torch.cdist(points_a.float(), points_b.float())  # [B, n_a, n_b]
    dist = dist.masked_fill(~valid_b[:, None, :], float("inf"))  # never a positive
    nearest, index = dist.min(2)
    return index, nearest <= radius


def dense_info_nce(q_a: torch.Tensor, q_b: torch.Tensor, positive: torch.Tensor, anchors: torch.Tensor,
                   valid_b: torch.Tensor, temperature: float, negatives: str = "image") -> torch.Tensor:
    """InfoNCE of view a's cells against view b's. q_*: [B, n, d] normalized; positive: [B, n_a] index into b's
    cells; anchors: [B, n_a] which of a's cells count; valid_b: [B, n_b] b's non-padded cells."""
    b, n_b = valid_b.shape
    if negatives == "image":
        logits = torch.einsum("bnd,bmd->bnm", q_a.float(), q_b.float()) / temperature
        logits = logits.masked_fill(~valid_b[:, None, :], PADDED)
        target = positive
    else:  # every valid cell of the batch's other view: one [B*n_a, B*n_b] matrix
        logits = torch.einsum("bnd,md->bnm", q_a.float(), q_b.reshape(-1, q_b.shape[-1]).float()) / temperature
        logits = logits.masked_fill(~valid_b.reshape(1, 1, -1), PADDED)
        target = positive + torch.arange(b, device=positive.device)[:, None] * n_b
    losses = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none")
    weight = anchors.flatten().to(losses.dtype)
    # no anchor (e.g. blank images): zero, still connected to the graph
    return (losses * weight).sum() / weight.sum().clamp(min=1.0)


@LOSSES.register("nt_xent")
class NTXent(nn.Module):
    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        return nt_xent(z1, z2, self.temperature)


@LOSSES.register("dense_info_nce")
class DenseInfoNCE(nn.Module):
    """Both directions (a -> b and b -> a), averaged. ``radius`` in feature cells; ``anchors: ink`` uses only
    cells holding ink as anchors (blank paper has no structure to match; it still serves as negatives)."""

    def __init__(self, temperature: float = 0.2, radius: float = 0.75, negatives: str = "image",
                 anchors: str = "ink"):
        super().__init__()
        if negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {', '.join(NEGATIVES)}, got {negatives!r}")
        if anchors not in ("ink", "all"):
            raise ValueError(f"anchors must be 'ink' or 'all', got {anchors!r}")
        if temperature <= 0 or radius <= 0:
            raise ValueError(f"temperature and radius must be > 0, got {temperature}, {radius}")
        self.temperature, self.radius, self.negatives, self.anchors = temperature, radius, negatives, anchors

    def forward(self, views: list[dict], stride: int) -> torch.Tensor:
        total = 0.0
        for a, b in ((views[0], views[1]), (views[1], views[0])):
            valid_a, valid_b = ~a["mask"].flatten(1), ~b["mask"].flatten(1)
            index, close = nearest_positives(a["points"].flatten(1, 2), b["points"].flatten(1, 2), valid_b,
                                             self.radius * stride)
            anchors = valid_a & close
            if self.anchors == "ink":
                anchors = anchors & a["ink"].flatten(1)
            total = total + dense_info_nce(a["dense"].flatten(2).transpose(1, 2), b["dense"].flatten(2).transpose(1, 2),
                                           index, anchors, valid_b, self.temperature, self.negatives)
        return total / 2


@LOSSES.register("mask_match_contrastive")
class MaskMatchContrastive(nn.Module):
    """Stage 1: ``{"global": global_weight * NT-Xent, "local": local_weight * dense InfoNCE}``."""

    def __init__(self, global_weight: float = 1.0, local_weight: float = 1.0, temperature: float = 0.1,
                 local_temperature: float = 0.2, radius: float = 0.75, negatives: str = "image",
                 anchors: str = "ink"):
        super().__init__()
        self.global_weight, self.local_weight = global_weight, local_weight
        self.global_loss = NTXent(temperature)
        self.local_loss = DenseInfoNCE(local_temperature, radius, negatives, anchors)

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        views = out["views"]
        losses = {}
        if self.global_weight:
            losses["global"] = self.global_weight * self.global_loss(views[0]["global"], views[1]["global"])
        if self.local_weight:
            losses["local"] = self.local_weight * self.local_loss(views, out["stride"])
        return losses


@LOSSES.register("mask_match")
class MaskMatch(nn.Module):
    """Stage 2: masked-view vectors z_m against unmasked-view vectors z_u [B, d].

    ``kind: info_nce``: -log softmax_j(cos(z_m[i], z_u[j]) / t)[i] averaged over i (the other images are the
    negatives; with one image it is 0); ``kind: cosine``: 1 - cos(z_m[i], z_u[i]). ``stop_gradient``: no gradient
    through the unmasked side (the target), as in BYOL/SimSiam."""

    def __init__(self, kind: str = "info_nce", temperature: float = 0.1, stop_gradient: bool = False):
        super().__init__()
        if kind not in ("info_nce", "cosine"):
            raise ValueError(f"kind must be 'info_nce' or 'cosine', got {kind!r}")
        self.kind, self.temperature, self.stop_gradient = kind, temperature, stop_gradient

    def forward(self, out: dict) -> dict[str, torch.Tensor]:
        z_m = F.normalize(out["masked"].float(), dim=1)
        z_u = F.normalize(out["unmasked"].float(), dim=1)
        if self.stop_gradient:
            z_u = z_u.detach()
        if self.kind == "cosine":
            return {"match": (1 - (z_m * z_u).sum(1)).mean()}
        logits = z_m @ z_u.t() / self.temperature
        return {"match": F.cross_entropy(logits, torch.arange(len(z_m), device=z_m.device))}
