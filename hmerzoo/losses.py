"""Main training objectives. A loss takes the decoder's output and the batch and returns a scalar
(or a dict of named scalars, which the model sums)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batch import Batch
from .model import IGNORE_INDEX, DecoderOutput
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
