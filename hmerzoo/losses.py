"""Main training objectives. A loss takes the decoder's output and the batch and returns a scalar
(or a dict of named scalars, which the model sums)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch import Batch
from .sequence import IGNORE_INDEX, DecoderOutput, to_device
from .registry import LOSSES


@LOSSES.register("cross_entropy")
class CrossEntropy(nn.Module):
    """Token-mean cross-entropy over every row of the decoder output (both directions for BTTR), ignoring
    padding - the objective of BTTR and CoMER. ``label_smoothing`` > 0 is an option none of them used."""

    def __init__(self, label_smoothing: float = 0.0, weight: float = 1.0):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.weight = weight

    def forward(self, output: DecoderOutput, batch: Batch) -> torch.Tensor:
        logits = output.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), output.targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, label_smoothing=self.label_smoothing)
        return self.weight * loss


@LOSSES.register("sequence_cross_entropy")
class SequenceCrossEntropy(nn.Module):
    """Cross-entropy averaged per sequence, then over the batch, summed over the directions - ABM's objective
    (official train.py: ``(loss * y_mask).sum(0) / y_mask.sum(0)``, ``.mean()``, ``loss = CE_L2R + CE_R2L``).

    Each row of the decoder output is one sequence; rows are grouped by ``output.directions`` (one group when the
    decoder names none), so every sample weighs the same whatever its length, and each direction counts once.
    """

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.weight = weight

    def forward(self, output: DecoderOutput, batch: Batch) -> torch.Tensor:
        logits, targets = output.logits, output.targets
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                     ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
        lengths = (targets != IGNORE_INDEX).sum(1).clamp_min(1)  # every row has its stop token; clamp is a guard
        per_sequence = token_loss.sum(1) / lengths
        directions = output.directions or ["all"] * targets.shape[0]
        total = per_sequence.new_zeros(())
        for direction in dict.fromkeys(directions):
            # row numbers known on the host: index_select picks the same values as a boolean mask would, without
            # the host waiting to learn how many rows the mask selects
            rows = to_device(torch.tensor([i for i, d in enumerate(directions) if d == direction]),
                             per_sequence.device)
            total = total + per_sequence.index_select(0, rows).mean()
        return self.weight * total
